// SPDX-License-Identifier: GPL-2.0
/*
 * The stub guard: a BPF LSM program that fails data access to a stub with EIO when no
 * agent will serve it, instead of letting the reader see the stub's holes as zeros.
 *
 * A data access (read, write, mmap, truncate, and everything that goes through
 * rw_verify_area: copy_file_range, splice, fallocate, clone) to a stub is allowed when
 *   - the caller is a registered holder (the agent: its fills and its own reads), or
 *   - the file was opened while an agent served the stub's filesystem (so the kernel
 *     decided at open time to raise pre-content events for it), and a registered holder
 *     is alive now (so the event will be answered rather than allowed by a dying group).
 * Everything else touching a stub gets EIO. Non-stubs pass after one hash-map lookup.
 *
 * The license must be GPL: bpf_get_file_xattr and the LSM attach points are GPL-only.
 */
#include "hsm_classify.bpf.h"

char LICENSE[] SEC("license") = "GPL";

extern struct task_struct *bpf_task_from_pid(__s32 pid) __ksym;
extern void bpf_task_release(struct task_struct *p) __ksym;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hsm_ctl);
} hsm_ctl SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, struct hsm_served);
} hsm_served SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1 << 20);
	__type(key, __u64);
	__type(value, struct hsm_file_state);
} hsm_files SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, HSM_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} hsm_stats SEC(".maps");

/* Present in the object so the skeleton generates Rust types for the shared layouts. */
struct hsm_ctl hsm_layout_ctl;
struct hsm_served hsm_layout_served;
struct hsm_file_state hsm_layout_file;
struct hsm_inode_state hsm_layout_inode;
struct hsm_inode_key hsm_layout_inode_key;

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&hsm_stats, &which);

	if (c)
		*c += 1;
}

static __always_inline void note_errno(int ret)
{
	__u32 which = HSM_STAT_LAST_XATTR_ERRNO;
	__u64 *c = bpf_map_lookup_elem(&hsm_stats, &which);

	if (c && ret < 0)
		*c = -ret;
}

/* Does the live process `tgid` still have the start time recorded at registration?
 * (A pid can be reused after the agent dies; its start time cannot.) */
static __always_inline int holder_alive(const struct hsm_holder *h)
{
	struct task_struct *t;
	int ok;

	if (!h->tgid)
		return 0;
	t = bpf_task_from_pid(h->tgid);
	if (!t)
		return 0;
	ok = t->tgid == (int)h->tgid && t->start_boottime / 10000000ULL == h->start_ticks;
	bpf_task_release(t);
	return ok;
}

static __always_inline int any_holder_alive(void)
{
	__u32 zero = 0;
	struct hsm_ctl *ctl = bpf_map_lookup_elem(&hsm_ctl, &zero);
	int i;

	if (!ctl)
		return 0;
#pragma unroll
	for (i = 0; i < HSM_MAX_HOLDERS; i++)
		if (holder_alive(&ctl->holders[i]))
			return 1;
	return 0;
}

/* Is the current process a registered holder? */
static __always_inline int current_is_holder(void)
{
	__u32 zero = 0, tgid = bpf_get_current_pid_tgid() >> 32;
	struct hsm_ctl *ctl = bpf_map_lookup_elem(&hsm_ctl, &zero);
	struct task_struct *me;
	int i;

	if (!ctl)
		return 0;
	me = bpf_get_current_task_btf();
#pragma unroll
	for (i = 0; i < HSM_MAX_HOLDERS; i++)
		if (ctl->holders[i].tgid == tgid &&
		    me->start_boottime / 10000000ULL == ctl->holders[i].start_ticks)
			return 1;
	return 0;
}

/* OVERLAYFS_SUPER_MAGIC (include/uapi/linux/magic.h). */
#define HSM_OVERLAYFS_MAGIC 0x794c7630UL

static __always_inline int served_now(struct inode *inode)
{
	struct super_block *sb = inode->i_sb;
	__u32 dev = sb->s_dev;

	if (bpf_map_lookup_elem(&hsm_served, &dev))
		return any_holder_alive();
	/* overlayfs shows a lower file's xattrs on its own inode, so a lower stub looks like a
	 * stub on the overlay too. The agent serves it through the lower file's events (an open
	 * through overlayfs fetches it whole first; docs/SEMANTICS.md, "Paths to a file"), so it
	 * is served while an agent is; the lower file's own checks still apply to every read. */
	if (sb->s_magic == HSM_OVERLAYFS_MAGIC)
		return any_holder_alive();
	return 0;
}

/* The decision for one data access to `file` (NULL for path-based truncate). */
static __always_inline int check_access(struct file *file, struct inode *inode)
{
	struct hsm_file_state *fs;
	__u64 key;

	if (hsm_cached_verdict(inode) != HSM_STUB)
		return 0;
	if (current_is_holder())
		return 0;
	if (file) {
		key = (__u64)file;
		fs = bpf_map_lookup_elem(&hsm_files, &key);
		if (!fs || !fs->served_at_open)
			goto deny;
	}
	if (!served_now(inode))
		goto deny;
	count(HSM_STAT_ALLOWED);
	return 0;
deny:
	count(HSM_STAT_DENIED);
	return -EIO;
}

SEC("lsm.s/file_open")
int BPF_PROG(hsm_file_open, struct file *file, int ret)
{
	struct hsm_file_state fs = {};
	__u64 key = (__u64)file;
	enum hsm_verdict verdict;

	if (ret)
		return ret;
	if (hsm_cached_verdict(file->f_inode) == HSM_NOT_STUB)
		return 0;
	count(HSM_STAT_CLASSIFIED);
	verdict = hsm_classify_file(file);
	if (verdict != HSM_STUB) {
		count(HSM_STAT_NO_MARKER);
		note_errno(hsm_last_xattr_ret);
		return 0;
	}
	if (hsm_last_xattr_ret < 0) {
		count(HSM_STAT_MARKER_ERR);
		note_errno(hsm_last_xattr_ret);
	}
	count(HSM_STAT_STUB_OPENS);
	if (current_is_holder())
		return 0;
	/* Opening is always allowed (stat, xattr tools, populate's checks); what this open
	 * may do with the data is decided now and enforced by the hooks below. */
	fs.served_at_open = served_now(file->f_inode);
	if (bpf_map_update_elem(&hsm_files, &key, &fs, BPF_ANY))
		count(HSM_STAT_FILES_FULL);
	return 0;
}

SEC("lsm/file_free_security")
void BPF_PROG(hsm_file_free, struct file *file)
{
	__u64 key = (__u64)file;

	bpf_map_delete_elem(&hsm_files, &key);
}

SEC("lsm/inode_free_security")
void BPF_PROG(hsm_inode_free, struct inode *inode)
{
	hsm_forget(inode);
}

SEC("lsm/file_permission")
int BPF_PROG(hsm_file_permission, struct file *file, int mask, int ret)
{
	if (ret)
		return ret;
	return check_access(file, file->f_inode);
}

SEC("lsm/mmap_file")
int BPF_PROG(hsm_mmap_file, struct file *file, unsigned long reqprot, unsigned long prot,
	     unsigned long flags, int ret)
{
	if (ret || !file)
		return ret;
	return check_access(file, file->f_inode);
}

SEC("lsm/file_truncate")
int BPF_PROG(hsm_file_truncate, struct file *file, int ret)
{
	if (ret)
		return ret;
	return check_access(file, file->f_inode);
}

SEC("lsm/path_truncate")
int BPF_PROG(hsm_path_truncate, const struct path *path, int ret)
{
	if (ret)
		return ret;
	return check_access(0, path->dentry->d_inode);
}

SEC("lsm/inode_post_setxattr")
void BPF_PROG(hsm_post_setxattr, struct dentry *dentry, const char *name, const void *value,
	      __u64 size, int flags)
{
	if (hsm_is_marker_name(name))
		hsm_set_cached(dentry->d_inode, 1);
}

SEC("lsm/inode_post_removexattr")
void BPF_PROG(hsm_post_removexattr, struct dentry *dentry, const char *name)
{
	if (hsm_is_marker_name(name))
		hsm_set_cached(dentry->d_inode, 0);
}
