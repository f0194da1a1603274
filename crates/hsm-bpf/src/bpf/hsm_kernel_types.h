/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The few kernel types the programs read, declared with preserve_access_index so libbpf
 * relocates every field access against the running kernel's BTF (CO-RE). Only the fields
 * used are listed; their order and offsets here do not matter.
 */
#ifndef HSM_KERNEL_TYPES_H
#define HSM_KERNEL_TYPES_H

#include <linux/types.h>
#include <linux/bpf.h>

#define __core __attribute__((preserve_access_index))

struct super_block {
	__u32 s_dev;
	unsigned long s_magic;
} __core;

struct inode {
	unsigned short i_mode;
	struct super_block *i_sb;
	unsigned long i_ino;
} __core;

struct dentry {
	struct inode *d_inode;
} __core;

struct vfsmount;

struct path {
	struct vfsmount *mnt;
	struct dentry *dentry;
} __core;

struct file {
	struct path f_path;
	struct inode *f_inode;
} __core;

struct task_struct {
	int tgid;
	__u64 start_boottime;
} __core;

/* Types of the proposed fanotify fastpath hook (RFC, late 2024; not in any released
 * kernel). Only their names matter for the struct_ops program's signature. */
struct fsnotify_group;
struct fanotify_fastpath_hook;
struct fanotify_fastpath_event {
	__u32 mask;
	const void *data;
	int data_type;
} __core;

#define S_IFMT 00170000
#define S_IFREG 0100000
#define ENODATA 61
#define EOPNOTSUPP 95
#define EIO 5

/* fsnotify data types (include/linux/fsnotify_backend.h); values are relocated by name
 * with bpf_core_enum_value, the numbers here are placeholders. */
enum fsnotify_data_type {
	FSNOTIFY_EVENT_FILE_RANGE = 1,
	FSNOTIFY_EVENT_PATH = 2,
};

/* Pre-content events carry a file range (6.14+). */
struct file_range {
	const struct path *path;
} __core;

#endif
