/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Layouts shared by the BPF programs and the Rust loader (crates/hsm-bpf).
 *
 * The Rust side never re-declares these structs by hand: build.rs compiles the programs,
 * libbpf-cargo turns the object's BTF into Rust types (the skeleton's `types` module), and
 * the loader encodes map values with the offsets of those generated types. A layout change
 * here changes both sides at once; tests in lib.rs pin the sizes the pinned maps expect.
 */
#ifndef HSM_SHARED_H
#define HSM_SHARED_H

/* The stub marker xattr (crates/hsm-stub: MARKER_XATTR, 12-byte value "HSMK"...). */
#define HSM_MARKER_XATTR "security.bpf.hsm"
#define HSM_MARKER_XATTR_LEN 17 /* with the NUL */
#define HSM_MARKER_LEN 12

/* Processes whose liveness means "stubs on served filesystems are being served":
 * the agent, and (later) a keeper holding the fanotify group across restarts. */
#define HSM_MAX_HOLDERS 4

struct hsm_holder {
	__u32 tgid;        /* process id in the initial pid namespace; 0 = empty slot */
	__u32 flags;       /* HSM_HOLDER_* */
	__u64 start_ticks; /* /proc/PID/stat field 22: start time in clock ticks (USER_HZ) */
};

#define HSM_HOLDER_AGENT 1u
#define HSM_HOLDER_KEEPER 2u

/* The single entry of the `hsm_ctl` array map. */
struct hsm_ctl {
	struct hsm_holder holders[HSM_MAX_HOLDERS];
	__u64 generation; /* bumped by every registration, for `hsm guard status` */
};

/* Value of the `hsm_served` hash map, keyed by the superblock's kernel dev_t
 * (major << 20 | minor): filesystems the agent has pre-content marks on. */
struct hsm_served {
	__u64 generation; /* registration that added it */
};

/* Key of the `hsm_inodes` map: an inode by its superblock's kernel dev_t and number. */
struct hsm_inode_key {
	__u32 dev;
	__u32 pad;
	__u64 ino;
};

/* Value of the `hsm_inodes` map: the classifier's cached verdict for one inode. */
struct hsm_inode_state {
	__u32 stub; /* 1: carries the marker (a stub, or a malformed marker: fail closed) */
	__u32 marker_len; /* length the classifier read, for diagnostics */
};

/* Value of the `hsm_files` hash map, keyed by the struct file address. Only stubs opened
 * while an agent served their filesystem get an entry: the kernel decides at open time
 * whether a file raises pre-content events, so a stub opened before the marks existed
 * never will, and reading it must fail instead of returning the holes as zeros. */
struct hsm_file_state {
	__u32 served_at_open;
	__u32 pad;
};

/* Counters in the `hsm_stats` per-CPU array. */
enum hsm_stat {
	HSM_STAT_CLASSIFIED = 0,   /* xattr reads by the classifier */
	HSM_STAT_STUB_OPENS = 1,   /* opens of stubs */
	HSM_STAT_DENIED = 2,       /* data accesses denied with EIO */
	HSM_STAT_ALLOWED = 3,      /* data accesses to stubs allowed */
	HSM_STAT_FILES_FULL = 4,   /* stub opens not recorded: hsm_files was full */
	HSM_STAT_NO_MARKER = 5,    /* classified: no marker (ENODATA / EOPNOTSUPP) */
	HSM_STAT_MARKER_ERR = 6,   /* classified: the marker could not be read (a stub) */
	HSM_STAT_LAST_XATTR_ERRNO = 7, /* the errno of the last failed marker read (diagnostics) */
	HSM_STAT_MAX = 8,
};

/* Fastpath verdicts (the proposed fanotify fastpath interface). */
#define HSM_FP_SEND_TO_USERSPACE 0
#define HSM_FP_SKIP_EVENT 1

#endif
