/* paths-listener: a minimal agent that serves "stubs" (files carrying the user.probe.stub xattr,
 * whose bytes live in SRC/NAME) and reports, for every event, through which kind of mount it came.
 * Usage: paths-listener ROOT SRC MODE
 *   ROOT  a directory on the filesystem to serve (the filesystem gets a mark)
 *   SRC   a directory holding the real bytes of each stub, by file name
 *   MODE  range    read-only event fds; each FAN_PRE_ACCESS range is filled through a by-handle
 *                  descriptor on a private clone mount of ROOT that carries a mount ignore mark
 *         open     as range, and a stub opened (FAN_OPEN_PERM) through a mount that is not in
 *                  the opener's /proc/PID/mountinfo is filled completely before the open is allowed
 *         noignore as range, without the ignore mark on the clone mount
 *         rw       read-write event fds (fanotify_init O_RDWR), no fills: shows EROFS
 * Prints "ready" once the marks are in place, then one line per event:
 *   KIND NAME mount=visible|hidden [stub] [range=OFF+COUNT] path=PATH   (hidden: the event fd's mount id is not in the opener's
 *                                      mountinfo, e.g. overlayfs' private mount of a lower layer)
 * followed by what it did. Every event is answered FAN_ALLOW. */
#include "probe.h"
#include <libgen.h>
#include <linux/mount.h>
#include <sys/xattr.h>

#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#endif
#ifndef OPEN_TREE_CLOEXEC
#define OPEN_TREE_CLOEXEC O_CLOEXEC
#endif

static const char *src;
static int clone_dir = -1;

static int mnt_id(int fd) {
  struct statx sx;
  if (statx(fd, "", AT_EMPTY_PATH, STATX_MNT_ID, &sx)) return -1;
  return (int)sx.stx_mnt_id;
}
/* Is mount MNT in /proc/PID/mountinfo (one of the opener's mounts)? */
static int visible(int pid, int mnt) {
  char p[64], line[4096];
  snprintf(p, sizeof p, "/proc/%d/mountinfo", pid);
  FILE *f = fopen(p, "r");
  if (!f) return -1;
  int found = 0, id;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "%d", &id) == 1 && id == mnt) { found = 1; break; }
  fclose(f);
  return found;
}
/* A writable descriptor for the event's file, opened by handle on the private clone mount. */
static int open_for_fill(int efd) {
  struct { struct file_handle h; unsigned char b[MAX_HANDLE_SZ]; } fh;
  int mid;
  fh.h.handle_bytes = MAX_HANDLE_SZ;
  if (name_to_handle_at(efd, "", &fh.h, &mid, AT_EMPTY_PATH)) return -1;
  return open_by_handle_at(clone_dir, &fh.h, O_RDWR | O_CLOEXEC);
}
/* Copy SRC/NAME[off, off+cnt) (cnt 0: all) into the stub; whole: drop the stub xattr after. */
static void fill(int efd, const char *name, uint64_t off, uint64_t cnt, int whole) {
  char sp[1024];
  snprintf(sp, sizeof sp, "%s/%s", src, name);
  int s = open(sp, O_RDONLY | O_CLOEXEC);
  struct stat st;
  if (s < 0 || fstat(s, &st)) { printf("  fill %s: no source\n", name); if (s >= 0) close(s); return; }
  if (whole || off + cnt > (uint64_t)st.st_size) cnt = off < (uint64_t)st.st_size ? st.st_size - off : 0;
  if (whole) off = 0, cnt = st.st_size;
  int w = open_for_fill(efd);
  if (w < 0) { printf("  fill %s through the clone: open_by_handle_at: %s\n", name, probe_errname(errno)); close(s); return; }
  char *buf = malloc(cnt ? cnt : 1);
  ssize_t n = pread(s, buf, cnt, off);
  ssize_t wr = n >= 0 ? pwrite(w, buf, n, off) : -1;
  if (whole && wr == (ssize_t)cnt) fremovexattr(w, "user.probe.stub");
  printf("  %s %s through the clone: %s\n", whole ? "hydrated" : "filled range of", name, wr == (ssize_t)cnt ? "ok" : probe_errname(errno));
  free(buf);
  close(w);
  close(s);
}

int main(int argc, char **argv) {
  if (argc < 4) { fprintf(stderr, "usage: paths-listener ROOT SRC range|open|noignore|rw\n"); return 2; }
  setvbuf(stdout, NULL, _IOLBF, 0);
  const char *root = argv[1], *mode = argv[3];
  src = argv[2];
  int rw = !strcmp(mode, "rw"), open_mode = !strcmp(mode, "open"), ignore = strcmp(mode, "noignore") != 0;
  int g = fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_UNLIMITED_QUEUE | FAN_CLOEXEC, (rw ? O_RDWR : O_RDONLY) | O_LARGEFILE);
  if (g < 0) { printf("fanotify_init: %s\n", probe_errname(errno)); return 1; }
  uint64_t mask = FAN_PRE_ACCESS | FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM;
  if (!rw) {
    int clone = syscall(SYS_open_tree, AT_FDCWD, root, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    if (clone < 0) { printf("open_tree(OPEN_TREE_CLONE): %s\n", probe_errname(errno)); return 1; }
    /* The O_PATH fd open_tree returns is refused by open_by_handle_at and by fanotify_mark with a
     * NULL path; a real directory fd on the clone is accepted by both. */
    struct { struct file_handle h; unsigned char b[MAX_HANDLE_SZ]; } fh;
    int mid;
    fh.h.handle_bytes = MAX_HANDLE_SZ;
    name_to_handle_at(clone, "", &fh.h, &mid, AT_EMPTY_PATH);
    int t = open_by_handle_at(clone, &fh.h, O_RDONLY);
    printf("open_by_handle_at(O_PATH clone fd): %s\n", t < 0 ? probe_errname(errno) : "ok");
    if (t >= 0) close(t);
    int r = fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_MOUNT | FAN_MARK_IGNORE_SURV, mask, clone, NULL);
    printf("fanotify_mark(O_PATH clone fd, NULL path): %s\n", r ? probe_errname(errno) : "ok");
    if (!r) fanotify_mark(g, FAN_MARK_REMOVE | FAN_MARK_MOUNT | FAN_MARK_IGNORE_SURV, mask, clone, NULL);
    clone_dir = openat(clone, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (clone_dir < 0) { printf("openat(clone, \".\"): %s\n", probe_errname(errno)); return 1; }
    t = open_by_handle_at(clone_dir, &fh.h, O_RDONLY);
    printf("open_by_handle_at(directory fd on the clone): %s\n", t < 0 ? probe_errname(errno) : "ok");
    if (t >= 0) close(t);
    if (ignore) {
      r = fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_MOUNT | FAN_MARK_IGNORE_SURV, mask, clone_dir, NULL);
      printf("mount ignore mark on the clone: %s\n", r ? probe_errname(errno) : "ok");
    }
    close(clone);
  }
  if (fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, AT_FDCWD, root)) { printf("filesystem mark: %s\n", probe_errname(errno)); return 1; }
  printf("ready\n");
  char buf[8192];
  for (;;) {
    ssize_t n = read(g, buf, sizeof buf);
    if (n < 0) { printf("read(group): %s\n", probe_errname(errno)); if (errno == EINTR) continue; usleep(100000); continue; }
    for (struct fanotify_event_metadata *m = (void *)buf; FAN_EVENT_OK(m, n); m = FAN_EVENT_NEXT(m, n)) {
      char lp[64], path[1024] = "?";
      snprintf(lp, sizeof lp, "/proc/self/fd/%d", m->fd);
      ssize_t l = readlink(lp, path, sizeof path - 1);
      if (l > 0) path[l] = 0;
      char base[1024];
      strcpy(base, path);
      const char *name = basename(base);
      int vis = visible(m->pid, mnt_id(m->fd));
      struct stat st;
      fstat(m->fd, &st);
      int stub = fgetxattr(m->fd, "user.probe.stub", NULL, 0) >= 0;
      uint64_t off = 0, cnt = 0;
      probe_event_range(m, &off, &cnt);
      char range[64] = "";
      if (m->mask & FAN_PRE_ACCESS) snprintf(range, sizeof range, " range=%llu+%llu", (unsigned long long)off, (unsigned long long)cnt);
      printf("%s %s mount=%s%s%s path=%s\n", probe_kind(m->mask), name, vis == 1 ? "visible" : vis == 0 ? "hidden" : "unknown",
             stub ? " stub" : "", range, path);
      if (st.st_mode & S_IXUSR) {
        int w = open_for_fill(m->fd);
        printf("  open O_RDWR by handle during this event: %s\n", w < 0 ? probe_errname(errno) : "ok");
        if (w >= 0) close(w);
      }
      if (stub && !rw) {
        if ((m->mask & FAN_OPEN_PERM) && open_mode && vis == 0) fill(m->fd, name, 0, 0, 1);
        else if (m->mask & FAN_PRE_ACCESS) fill(m->fd, name, off, cnt, 0);
      }
      probe_answer(g, m->fd, FAN_ALLOW);
      close(m->fd);
    }
  }
}
