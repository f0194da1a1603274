/* events: which operations raise FAN_PRE_ACCESS, with what range; which marks are refused;
 * what ignore marks do.  Usage: events DIR [TMPFS_DIR]
 * DIR is an empty directory on ext4, xfs or btrfs (the whole filesystem gets a mark).
 * Each line: the operation, then the events it raised ("none" if it raised nothing). */
#include "probe.h"
#include <pthread.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/uio.h>
#include <linux/falloc.h>

static int g;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char log_buf[4096];

static void *listener(void *arg) {
  (void)arg;
  char buf[8192];
  for (;;) {
    ssize_t n = read(g, buf, sizeof buf);
    if (n <= 0) { if (n < 0 && errno == EINTR) continue; return NULL; }
    for (struct fanotify_event_metadata *m = (void *)buf; FAN_EVENT_OK(m, n); m = FAN_EVENT_NEXT(m, n)) {
      uint64_t off = 0, cnt = 0;
      int has = probe_event_range(m, &off, &cnt);
      char one[128];
      if (has) snprintf(one, sizeof one, " %s[%llu+%llu]", probe_kind(m->mask), (unsigned long long)off, (unsigned long long)cnt);
      else snprintf(one, sizeof one, " %s[no range]", probe_kind(m->mask));
      pthread_mutex_lock(&mu);
      strncat(log_buf, one, sizeof log_buf - strlen(log_buf) - 1);
      pthread_mutex_unlock(&mu);
      probe_answer(g, m->fd, FAN_ALLOW);
      close(m->fd);
    }
  }
}

static void begin(void) { pthread_mutex_lock(&mu); log_buf[0] = 0; pthread_mutex_unlock(&mu); }
static void end(const char *what, const char *result) {
  pthread_mutex_lock(&mu);
  printf("%-44s events:%s%s\n", what, log_buf[0] ? log_buf : " none", result ? result : "");
  log_buf[0] = 0;
  pthread_mutex_unlock(&mu);
  fflush(stdout);
}

/* A sparse file of SIZE bytes, created before or after the marks (creating raises nothing). */
static void mkfile(const char *dir, const char *name, off_t size, char *path) {
  sprintf(path, "%s/%s", dir, name);
  int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
  if (fd < 0 || ftruncate(fd, size)) { perror(path); exit(1); }
  close(fd);
}
static int op(const char *path, int flags) {
  int fd = open(path, flags, 0644);
  if (fd < 0) { perror(path); exit(1); }
  return fd;
}

int main(int argc, char **argv) {
  if (argc < 2) { fprintf(stderr, "usage: events DIR [TMPFS_DIR]\n"); return 2; }
  const char *d = argv[1];
  char a[512], b[512], c[512], early[512], small[512], ign[512], ign2[512], ign3[512];
  static char buf[1 << 16] __attribute__((aligned(4096)));

  mkfile(d, "early", 65536, early);
  int early_fd = op(early, O_RDONLY);

  int rej = fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_REPORT_FID, O_RDONLY);
  printf("fanotify_init(PRE_CONTENT|REPORT_FID): %s\n", rej < 0 ? probe_errname(errno) : "accepted");
  g = fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_UNLIMITED_QUEUE | FAN_CLOEXEC, O_RDONLY | O_LARGEFILE);
  if (g < 0) { printf("fanotify_init(PRE_CONTENT): %s\n", probe_errname(errno)); return 1; }
  printf("fanotify_init(PRE_CONTENT|UNLIMITED_QUEUE|CLOEXEC, O_RDONLY|O_LARGEFILE): ok\n");

  int r = fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_ONLYDIR, FAN_PRE_ACCESS | FAN_ONDIR, AT_FDCWD, d);
  printf("mark directory with PRE_ACCESS|ONDIR: %s\n", r ? probe_errname(errno) : "accepted");
  int nsfd = open("/proc/self/ns/mnt", O_RDONLY);
  r = fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_MNTNS, FAN_PRE_ACCESS, nsfd, NULL);
  printf("mntns mark with PRE_ACCESS: %s\n", r ? probe_errname(errno) : "accepted");
  close(nsfd);
  r = fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_PRE_ACCESS, AT_FDCWD, d);
  printf("mount mark with PRE_ACCESS: %s\n", r ? probe_errname(errno) : "accepted");
  if (!r) fanotify_mark(g, FAN_MARK_REMOVE | FAN_MARK_MOUNT, FAN_PRE_ACCESS, AT_FDCWD, d);
  if (argc > 2) {
    r = fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_PRE_ACCESS, AT_FDCWD, argv[2]);
    printf("filesystem mark on %s: %s\n", "tmpfs", r ? probe_errname(errno) : "accepted");
    if (!r) fanotify_mark(g, FAN_MARK_REMOVE | FAN_MARK_FILESYSTEM, FAN_PRE_ACCESS, AT_FDCWD, argv[2]);
  }
  if (fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_PRE_ACCESS, AT_FDCWD, d)) {
    printf("filesystem mark with PRE_ACCESS: %s\n", probe_errname(errno));
    return 1;
  }
  printf("filesystem mark with PRE_ACCESS: accepted\n");

  pthread_t t;
  pthread_create(&t, NULL, listener, NULL);
  int fd, fd2, pfd[2];
  ssize_t n;
  char res[128];

  mkfile(d, "a", 65536, a);
  mkfile(d, "b", 65536, b);
  mkfile(d, "small", 5000, small);

  begin(); fd = op(a, O_RDONLY); end("open(O_RDONLY), stat", NULL);
  begin(); n = read(fd, buf, 100); end("read 100 at 0", NULL);
  begin(); n = pread(fd, buf, 10, 20000); end("pread 10 at 20000", NULL);
  struct iovec iov[2] = {{buf, 10}, {buf + 10, 10}};
  begin(); n = preadv(fd, iov, 2, 40960); end("preadv 2x10 at 40960", NULL);
  close(fd);
  begin(); fd = op(a, O_RDONLY | O_DIRECT); n = pread(fd, buf, 4096, 8192);
  snprintf(res, sizeof res, " (read %zd)", n); end("O_DIRECT pread 4096 at 8192", res); close(fd);
  begin(); fd = op(a, O_WRONLY); n = pwrite(fd, "x", 1, 30000); end("pwrite 1 at 30000", NULL);
  begin(); n = write(fd, "x", 1); end("write 1 at 0", NULL); close(fd);
  begin(); fd = op(b, O_RDWR); r = ftruncate(fd, 40000); end("ftruncate 65536 -> 40000", NULL);
  begin(); r = ftruncate(fd, 50000); end("ftruncate 40000 -> 50000", NULL);
  begin(); r = fallocate(fd, 0, 60000, 100); end("fallocate mode 0 at 60000+100", NULL);
  begin(); r = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 4096); end("fallocate PUNCH_HOLE 4096+4096", NULL);
  begin(); r = fallocate(fd, FALLOC_FL_ZERO_RANGE, 12288, 4096); end("fallocate ZERO_RANGE 12288+4096", NULL);
  close(fd);
  begin(); r = truncate(b, 30000); end("truncate(path) 50000 -> 30000", NULL);
  mkfile(d, "c", 0, c);
  begin(); fd = op(a, O_RDONLY); fd2 = op(c, O_WRONLY); loff_t in = 0, out = 0;
  n = copy_file_range(fd, &in, fd2, &out, 8192, 0); end("copy_file_range a[0+8192] -> c (empty)", NULL);
  close(fd2);
  fd2 = op(c, O_RDWR); begin(); in = 0;
  n = sendfile(fd2, fd, &in, 4096); end("sendfile a[0+4096] -> c", NULL);
  r = pipe(pfd); begin(); in = 0; n = sendfile(pfd[1], fd, &in, 4096); end("sendfile a[0+4096] -> pipe", NULL);
  close(pfd[0]); close(pfd[1]); close(fd2);
  begin(); fd2 = op(c, O_WRONLY | O_TRUNC); end("open(O_TRUNC)", NULL); close(fd2);
  begin(); char *p = mmap(NULL, 3 * 4096, PROT_READ, MAP_SHARED, fd, 8192); end("mmap 3 pages at 8192", NULL);
  begin(); volatile char s = 0; for (int i = 0; i < 3; i++) s += p[i * 4096]; end("touch the 3 mapped pages", NULL);
  munmap(p, 3 * 4096); close(fd);
  begin(); fd = op(small, O_RDONLY); n = pread(fd, buf, 65536, 0);
  snprintf(res, sizeof res, " (file size 5000, read %zd)", n); end("pread 65536 at 0 of a 5000-byte file", res); close(fd);
  begin(); n = pread(early_fd, buf, 4096, 0);
  snprintf(res, sizeof res, " (read %zd)", n); end("pread on an fd opened before the mark", res);

  /* Ignore marks. */
  mkfile(d, "ign", 65536, ign);
  r = fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_INODE | FAN_MARK_IGNORE_SURV | FAN_MARK_EVICTABLE, FAN_PRE_ACCESS, AT_FDCWD, ign);
  printf("inode ignore mark IGNORE_SURV|EVICTABLE: %s\n", r ? probe_errname(errno) : "accepted");
  begin(); fd = op(ign, O_RDONLY); n = pread(fd, buf, 100, 0); end("  read of the ignore-marked file", NULL); close(fd);
  begin(); fd = op(ign, O_WRONLY); n = pwrite(fd, "x", 1, 0); close(fd); fd = op(ign, O_RDONLY); n = pread(fd, buf, 100, 4096); close(fd);
  end("  write, then read of it", NULL);
  mkfile(d, "ign2", 65536, ign2);
  r = fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_INODE | FAN_MARK_IGNORE, FAN_PRE_ACCESS, AT_FDCWD, ign2);
  printf("inode ignore mark without SURV_MODIFY: %s\n", r ? probe_errname(errno) : "accepted");
  begin(); fd = op(ign2, O_RDONLY); n = pread(fd, buf, 100, 0); close(fd); end("  read of it", NULL);
  begin(); fd = op(ign2, O_WRONLY); n = pwrite(fd, "x", 1, 0); close(fd); end("  write to it", NULL);
  begin(); fd = op(ign2, O_RDONLY); n = pread(fd, buf, 100, 8192); close(fd); end("  read after the write", NULL);
  mkfile(d, "ign3", 65536, ign3);
  fd2 = op(ign3, O_WRONLY);
  r = fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_INODE | FAN_MARK_IGNORE, FAN_PRE_ACCESS, AT_FDCWD, ign3);
  printf("the same mark while the file is open for write: %s\n", r ? probe_errname(errno) : "accepted");
  begin(); fd = op(ign3, O_RDONLY); n = pread(fd, buf, 100, 0); close(fd); end("  read of it", NULL);
  close(fd2);
  (void)n; (void)s;
  return 0;
}
