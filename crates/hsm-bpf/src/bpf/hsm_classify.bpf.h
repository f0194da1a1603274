/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The classifier: "is this inode a stub?", shared by the guard (LSM) and the fastpath
 * (fanotify struct_ops) programs.
 *
 * The truth lives on disk, in the `security.bpf.hsm` marker xattr that only privileged
 * users can set. Reading an xattr needs a sleepable kfunc that only LSM programs on
 * sleepable hooks may call (file_open is one), so the guard classifies each regular file
 * when it is opened and caches the verdict in BPF inode storage. Everything else (the
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

struct {
	__uint(type, BPF_MAP_TYPE_INODE_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct hsm_inode_state);
} hsm_inodes SEC(".maps");

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

	if (!hsm_is_regular(inode))
		return HSM_NOT_STUB;
	st = bpf_inode_storage_get(&hsm_inodes, inode, 0, 0);
	if (!st)
		return HSM_UNKNOWN;
	return st->stub ? HSM_STUB : HSM_NOT_STUB;
}

/* Classify from the marker xattr and cache the verdict. Sleepable LSM programs only. */
static __always_inline enum hsm_verdict hsm_classify_file(struct file *file)
{
	struct inode *inode = file->f_inode;
	struct hsm_inode_state *st;
	struct bpf_dynptr value;
	char buf[16] = {};
	int len;

	if (!hsm_is_regular(inode))
		return HSM_NOT_STUB;
	st = bpf_inode_storage_get(&hsm_inodes, inode, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!st)
		return HSM_UNKNOWN;
	bpf_dynptr_from_mem(buf, sizeof(buf), 0, &value);
	len = bpf_get_file_xattr(file, HSM_MARKER_XATTR, &value);
	if (len == -ENODATA || len == -EOPNOTSUPP) {
		st->stub = 0;
		st->marker_len = 0;
		return HSM_NOT_STUB;
	}
	/* Present, or present but unreadable (too long, I/O error): a stub either way. */
	st->stub = 1;
	st->marker_len = len < 0 ? 0 : len;
	return HSM_STUB;
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
	struct hsm_inode_state *st;

	if (!hsm_is_regular(inode))
		return;
	st = bpf_inode_storage_get(&hsm_inodes, inode, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (st)
		st->stub = stub;
}

#endif
