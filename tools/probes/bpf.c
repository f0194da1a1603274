/* bpf: what BPF can do here, for the guard and a fanotify hook.
 * Usage: bpf   (root). Looks up names in the kernel's BTF (/sys/kernel/btf/vmlinux) and loads
 * three trivial programs ("return 0") with the bpf() syscall: a socket filter, an LSM program on
 * file_open, and an fentry program on vfs_read. Prints what each load returned. */
#include "probe.h"
#include <linux/bpf.h>
#include <linux/btf.h>

static char *btf;
static long btf_len;

/* The BTF type id of NAME with kind KIND, or -1. */
static int btf_find(const char *name, int kind) {
  const struct btf_header *h = (const void *)btf;
  const char *types = btf + h->hdr_len + h->type_off, *strs = btf + h->hdr_len + h->str_off;
  const char *p = types, *end = types + h->type_len;
  int id = 1;
  while (p < end) {
    const struct btf_type *t = (const void *)p;
    int k = BTF_INFO_KIND(t->info), vlen = BTF_INFO_VLEN(t->info);
    if (k == kind && !strcmp(strs + t->name_off, name)) return id;
    p += sizeof *t;
    switch (k) {
    case BTF_KIND_INT: p += 4; break;
    case BTF_KIND_ARRAY: p += sizeof(struct btf_array); break;
    case BTF_KIND_STRUCT: case BTF_KIND_UNION: p += vlen * sizeof(struct btf_member); break;
    case BTF_KIND_ENUM: p += vlen * sizeof(struct btf_enum); break;
    case BTF_KIND_FUNC_PROTO: p += vlen * sizeof(struct btf_param); break;
    case BTF_KIND_VAR: p += sizeof(struct btf_var); break;
    case BTF_KIND_DATASEC: p += vlen * sizeof(struct btf_var_secinfo); break;
    case 17 /* DECL_TAG */: p += 4; break;
    case 19 /* ENUM64 */: p += vlen * 12; break;
    default: break;
    }
    id++;
  }
  return -1;
}
static const char *load(int type, int attach_type, int btf_id) {
  struct bpf_insn insns[] = {
      {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_0, .imm = 0},
      {.code = BPF_JMP | BPF_EXIT},
  };
  static char log[65536];
  union bpf_attr a;
  memset(&a, 0, sizeof a);
  a.prog_type = type;
  a.insns = (uintptr_t)insns;
  a.insn_cnt = 2;
  a.license = (uintptr_t) "GPL";
  a.expected_attach_type = attach_type;
  a.attach_btf_id = btf_id;
  a.log_buf = (uintptr_t)log;
  a.log_size = sizeof log;
  a.log_level = 1;
  log[0] = 0;
  int fd = syscall(SYS_bpf, BPF_PROG_LOAD, &a, sizeof a);
  static char out[128];
  if (fd >= 0) { close(fd); return "loaded"; }
  snprintf(out, sizeof out, "%s (verifier log %s)", probe_errname(errno), log[0] ? "not empty" : "empty");
  return out;
}
int main(void) {
  FILE *f = fopen("/sys/kernel/btf/vmlinux", "r");
  if (!f) { printf("kernel BTF: absent\n"); return 1; }
  btf = malloc(64 << 20);
  btf_len = fread(btf, 1, 64 << 20, f);
  fclose(f);
  printf("kernel BTF: present\n");
  printf("fanotify_fastpath_ops (the unmerged BPF hook in fanotify): %s\n", btf_find("fanotify_fastpath_ops", BTF_KIND_STRUCT) > 0 ? "present" : "absent");
  int lsm = btf_find("bpf_lsm_file_open", BTF_KIND_FUNC), fentry = btf_find("vfs_read", BTF_KIND_FUNC);
  printf("bpf_lsm_file_open in BTF: %s\n", lsm > 0 ? "present" : "absent");
  printf("socket filter program: %s\n", load(BPF_PROG_TYPE_SOCKET_FILTER, 0, 0));
  printf("LSM program on file_open: %s\n", lsm > 0 ? load(BPF_PROG_TYPE_LSM, BPF_LSM_MAC, lsm) : "not tried");
  printf("fentry program on vfs_read: %s\n", fentry > 0 ? load(BPF_PROG_TYPE_TRACING, BPF_TRACE_FENTRY, fentry) : "not tried");
  return 0;
}
