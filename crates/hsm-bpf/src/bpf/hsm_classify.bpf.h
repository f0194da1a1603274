/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The classifier: "is this inode a stub?", shared by the guard (LSM) and the fastpath
 * (fanotify struct_ops) programs.
 *
 * The truth lives on disk, in the `security.bpf.hsm` marker xattr that only privileged
 * users can set. Reading an xattr needs a sleepable kfunc that only LSM programs on
 * sleepable hooks may call (file_open is one), so the guard classifies each regular file
 * when it is opened and caches the verdict in a hash map keyed by (device, inode number);
 * the entry is dropped when the kernel frees the inode. Everything else (the
 * guard's data-access hooks, the fastpath handler) reads the cached verdict. The xattr
 * hooks keep the cache true when the marker is set (populate) or removed (the agent
 * finalising a fully fetched stub).
 *
 * Failing closed: an inode whose marker exists but cannot be read or is malformed is a
 * stub. An inode that was never classified (opened before the guard was installed) is
 * "unknown"; callers decide what unknown means for them.
 */
#ifndef HSM_CLASSIFY_BPF_H
#define HSM_CLASSIFY_BPF_H

#include "hsm_kernel_types.h"
#include "hsm_shared.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

extern int bpf_get_file_xattr(struct file *file, const char *name__str,
			      struct bpf_dynptr *value_p) __ksym __weak;

/* BPF inode storage would be the natural home for the verdict, but on Debian's 7.3 kernel
 * bpf_inode_storage_get(..., F_CREATE) returned NULL from the sleepable file_open hook
 * (docs/BPF.md); a hash map works on every kernel. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1 << 20);
	__type(key, struct hsm_inode_key);
	__type(value, struct hsm_inode_state);
} hsm_inodes SEC(".maps");

static __always_inline struct hsm_inode_key hsm_key(struct inode *inode)
{
	struct hsm_inode_key k = {
		.dev = inode->i_sb->s_dev,
		.ino = inode->i_ino,
	};
	return k;
}

/* Where the classifier reads the marker into. bpf_dynptr_from_mem needs map memory (7.x
 * refuses a stack buffer), so a global (.bss, an array map value). Several CPUs may read
 * into it at once: harmless, the verdict depends only on the kfunc's return value. */
char hsm_marker_buf[32];
/* The last value bpf_get_file_xattr returned (diagnostics, shown by `hsm guard status`). */
int hsm_last_xattr_ret;

enum hsm_verdict {
	HSM_UNKNOWN = 0,
	HSM_NOT_STUB = 1,
	HSM_STUB = 2,
};

static __always_inline int hsm_is_regular(struct inode *inode)
{
	return inode && (inode->i_mode & S_IFMT) == S_IFREG;
}

/* The cached verdict for an inode; never reads the disk. Callable from any program. */
static __always_inline enum hsm_verdict hsm_cached_verdict(struct inode *inode)
{
	struct hsm_inode_state *st;

	struct hsm_inode_key k;

	if (!hsm_is_regular(inode))
		return HSM_NOT_STUB;
	k = hsm_key(inode);
	st = bpf_map_lookup_elem(&hsm_inodes, &k);
	if (!st)
		return HSM_UNKNOWN;
	return st->stub ? HSM_STUB : HSM_NOT_STUB;
}

/* Classify from the marker xattr and cache the verdict. Sleepable LSM programs only. */
static __always_inline enum hsm_verdict hsm_classify_file(struct file *file)
{
	struct inode *inode = file->f_inode;
	struct hsm_inode_state st = {};
	struct hsm_inode_key k;
	struct bpf_dynptr value;
	int len;

	if (!hsm_is_regular(inode))
		return HSM_NOT_STUB;
	k = hsm_key(inode);
	bpf_dynptr_from_mem(hsm_marker_buf, sizeof(hsm_marker_buf), 0, &value);
	len = bpf_get_file_xattr(file, HSM_MARKER_XATTR, &value);
	hsm_last_xattr_ret = len;
	if (len == -ENODATA || len == -EOPNOTSUPP) {
		bpf_map_update_elem(&hsm_inodes, &k, &st, BPF_ANY);
		return HSM_NOT_STUB;
	}
	/* Present, or present but unreadable (too long, I/O error): a stub either way. */
	st.stub = 1;
	st.marker_len = len < 0 ? 0 : len;
	/* If the map is full the verdict is not cached: this open still counts as a stub, and
	 * the next open classifies again. */
	bpf_map_update_elem(&hsm_inodes, &k, &st, BPF_ANY);
	return HSM_STUB;
}

/* The kernel is freeing the inode: forget its verdict (the number may be reused). */
static __always_inline void hsm_forget(struct inode *inode)
{
	struct hsm_inode_key k;

	if (!inode || !hsm_is_regular(inode))
		return;
	k = hsm_key(inode);
	bpf_map_delete_elem(&hsm_inodes, &k);
}

/* Called by the xattr hooks: is `name` the marker? */
static __always_inline int hsm_is_marker_name(const char *name)
{
	char got[HSM_MARKER_XATTR_LEN + 1] = {};
	const char want[] = HSM_MARKER_XATTR;
	int i;

	if (bpf_probe_read_kernel_str(got, sizeof(got), name) != HSM_MARKER_XATTR_LEN)
		return 0;
#pragma unroll
	for (i = 0; i < HSM_MARKER_XATTR_LEN; i++)
		if (got[i] != want[i])
			return 0;
	return 1;
}

static __always_inline void hsm_set_cached(struct inode *inode, __u32 stub)
{
	struct hsm_inode_state st = { .stub = stub };
	struct hsm_inode_key k;

	if (!inode || !hsm_is_regular(inode))
		return;
	k = hsm_key(inode);
	bpf_map_update_elem(&hsm_inodes, &k, &st, BPF_ANY);
}

#endif
