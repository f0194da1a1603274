// SPDX-License-Identifier: GPL-2.0
/*
 * The fanotify fastpath handler: a struct_ops program for the fastpath interface proposed
 * upstream in late 2024 (struct fanotify_fastpath_ops, attached to a group with the
 * FAN_IOC_ADD_FP ioctl). It lets pre-content events for inodes the classifier knows are
 * not stubs skip the trip to user space. No released kernel has the interface (checked up
 * to 7.3): the loader only loads this object when the running kernel's BTF declares the
 * type, and otherwise the agent relies on ignore marks. See docs/BPF.md.
 *
 * It uses the guard's cached verdicts (the same classifier, the same pinned verdict map):
 * a struct_ops handler cannot call the sleepable xattr kfunc. Unknown means "send".
 */
#include "hsm_classify.bpf.h"

char LICENSE[] SEC("license") = "GPL";

static __always_inline struct inode *event_inode(struct fanotify_fastpath_event *ev)
{
	const struct path *path = 0;

	if (bpf_core_enum_value_exists(enum fsnotify_data_type, FSNOTIFY_EVENT_FILE_RANGE) &&
	    ev->data_type == bpf_core_enum_value(enum fsnotify_data_type, FSNOTIFY_EVENT_FILE_RANGE))
		path = ((const struct file_range *)ev->data)->path;
	else if (ev->data_type == bpf_core_enum_value(enum fsnotify_data_type, FSNOTIFY_EVENT_PATH))
		path = ev->data;
	if (!path)
		return 0;
	return BPF_CORE_READ(path, dentry, d_inode);
}

SEC("struct_ops/fp_handler")
int BPF_PROG(hsm_fp_handler, struct fsnotify_group *group, struct fanotify_fastpath_hook *hook,
	     struct fanotify_fastpath_event *ev)
{
	struct inode *inode = event_inode(ev);

	if (inode && hsm_cached_verdict(inode) == HSM_NOT_STUB)
		return HSM_FP_SKIP_EVENT;
	return HSM_FP_SEND_TO_USERSPACE;
}

SEC("struct_ops/fp_init")
int BPF_PROG(hsm_fp_init, struct fanotify_fastpath_hook *hook, const char *args)
{
	return 0;
}

SEC("struct_ops/fp_free")
void BPF_PROG(hsm_fp_free, struct fanotify_fastpath_hook *hook)
{
}

struct fanotify_fastpath_ops {
	int (*fp_handler)(struct fsnotify_group *group, struct fanotify_fastpath_hook *hook,
			  struct fanotify_fastpath_event *ev);
	int (*fp_init)(struct fanotify_fastpath_hook *hook, const char *args);
	void (*fp_free)(struct fanotify_fastpath_hook *hook);
	__u32 flags;
	char name[16];
};

SEC(".struct_ops.link")
struct fanotify_fastpath_ops hsm_fastpath = {
	.fp_handler = (void *)hsm_fp_handler,
	.fp_init = (void *)hsm_fp_init,
	.fp_free = (void *)hsm_fp_free,
	.name = "hsm",
};
