/* responses: how answers work and what happens when nobody answers.
 * Usage: responses DIR   (an empty directory on ext4, xfs or btrfs; needs root)
 * Sections: the errnos a deny may carry; an invalid errno; the group released with an event
 * pending (close, kill); a group kept alive by another process (orphaned events answered by fd
 * number, the number-reuse hazard and the reservation that avoids it); a bounded queue;
 * a listener that cannot open the event fd (EMFILE). */
#include "probe.h"
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>

static const char *dir;
static int nfile;

/* Sparse files (one hole each), made before any mark exists: ftruncate raises events too. */
static void makefiles(int count) {
  char path[512];
  for (int i = 0; i < count; i++) {
    sprintf(path, "%s/r%d", dir, i);
    int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    if (fd < 0 || ftruncate(fd, 65536)) { perror(path); exit(1); }
    close(fd);
  }
}
/* The next unused file; its path in PATH. */
static void newfile(char *path) { sprintf(path, "%s/r%d", dir, nfile++); }
/* A reader process: one pread of one byte. Exit status: 0 read a zero, 100 read a non-zero byte,
 * 101 read nothing, else the errno. */
static pid_t reader(const char *path) {
  pid_t p = fork();
  if (p == 0) {
    char c = 1;
    /* A forked reader would otherwise hold the group fd and keep the group alive. */
    for (int i = 3; i < 256; i++) close(i);
    int fd = open(path, O_RDONLY);
    if (fd < 0) _exit(errno);
    ssize_t n = pread(fd, &c, 1, 0);
    _exit(n == 1 ? (c ? 100 : 0) : n == 0 ? 101 : errno);
  }
  return p;
}
/* The reader's result after up to MS milliseconds, or "still waiting". */
static const char *result(pid_t p, int ms) {
  static char out[64];
  int st;
  for (int i = 0; i <= ms / 10; i++) {
    if (waitpid(p, &st, WNOHANG) == p) {
      int c = WEXITSTATUS(st);
      snprintf(out, sizeof out, "%s", c == 0 ? "read zeros" : c == 100 ? "read data" : c == 101 ? "read nothing" : probe_errname(c));
      return out;
    }
    usleep(10000);
  }
  return "still waiting";
}
static int group(int flags) {
  int g = fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | flags, O_RDONLY | O_LARGEFILE);
  if (g < 0) { perror("fanotify_init"); exit(1); }
  if (fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_PRE_ACCESS, AT_FDCWD, dir)) { perror("fanotify_mark"); exit(1); }
  return g;
}
/* Read exactly one event; returns its fd. */
static int one_event(int g) {
  char buf[4096];
  ssize_t n = read(g, buf, sizeof buf);
  if (n <= 0) { printf("  read(group): %s\n", n < 0 ? probe_errname(errno) : "0"); return -1; }
  struct fanotify_event_metadata *m = (void *)buf;
  return m->fd;
}

int main(int argc, char **argv) {
  if (argc < 2) { fprintf(stderr, "usage: responses DIR\n"); return 2; }
  dir = argv[1];
  setvbuf(stdout, NULL, _IOLBF, 0);
  makefiles(40);
  char path[512];
  pid_t r1, r2;
  int fd;

  printf("== deny responses\n");
  int g = group(FAN_UNLIMITED_QUEUE);
  int errnos[] = {0, EIO, EPERM, EBUSY, ETXTBSY, EAGAIN, ENOSPC, EDQUOT, ENOENT, EINVAL, EROFS, EACCES};
  for (unsigned i = 0; i < sizeof errnos / sizeof *errnos; i++) {
    newfile(path);
    r1 = reader(path);
    fd = one_event(g);
    uint32_t resp = errnos[i] ? PROBE_DENY_ERRNO(errnos[i]) : FAN_DENY;
    struct fanotify_response rr = {.fd = fd, .response = resp};
    int ok = write(g, &rr, sizeof rr) == sizeof rr;
    int werr = errno;
    char label[64];
    snprintf(label, sizeof label, "%s%s", errnos[i] ? "FAN_DENY with " : "plain FAN_DENY", errnos[i] ? probe_errname(errnos[i]) : "");
    if (ok) {
      printf("%-28s response accepted; reader: %s\n", label, result(r1, 2000));
    } else {
      const char *w = result(r1, 300);
      printf("%-28s response write: %s; reader after 0.3 s: %s;", label, probe_errname(werr), w);
      probe_answer(g, fd, FAN_ALLOW);
      printf(" after FAN_ALLOW: %s\n", result(r1, 2000));
    }
    close(fd);
  }

  printf("== the group released with an event pending\n");
  newfile(path);
  r1 = reader(path);
  fd = one_event(g);
  close(g);
  printf("close(group) without answering: reader: %s\n", result(r1, 2000));
  close(fd);
  r1 = reader(path);
  printf("a later read of the same stub (no group): %s\n", result(r1, 2000));

  int pp[2];
  if (pipe(pp)) return 1;
  newfile(path);
  pid_t l = fork();
  if (l == 0) {
    int gg = group(FAN_UNLIMITED_QUEUE);
    if (write(pp[1], "r", 1) != 1) _exit(1);
    int efd = one_event(gg);
    if (write(pp[1], &efd, sizeof efd) != sizeof efd) _exit(1);
    pause();
    _exit(0);
  }
  char c;
  if (read(pp[0], &c, 1) != 1) return 1;
  r1 = reader(path);
  int num;
  if (read(pp[0], &num, sizeof num) != sizeof num) return 1;
  kill(l, SIGKILL);
  waitpid(l, NULL, 0);
  printf("listener SIGKILLed holding an unanswered event (the only group fd): reader: %s\n", result(r1, 2000));

  printf("== the group kept alive by another process\n");
  for (int reserve = 0; reserve <= 1; reserve++) {
    g = group(FAN_UNLIMITED_QUEUE);
    char p1[512], p2[512];
    newfile(p1);
    newfile(p2);
    l = fork();
    if (l == 0) {
      int efd = one_event(g);
      if (write(pp[1], &efd, sizeof efd) != sizeof efd) _exit(1);
      pause();
      _exit(0);
    }
    r1 = reader(p1);
    if (read(pp[0], &num, sizeof num) != sizeof num) return 1;
    kill(l, SIGKILL);
    waitpid(l, NULL, 0);
    printf("%s: listener killed holding event fd %d; reader 1: %s\n", reserve ? "with reservation" : "no reservation", num,
           result(r1, 500));
    int placeholder = -1;
    if (reserve) {
      placeholder = open("/dev/null", O_RDONLY | O_CLOEXEC);
      dup2(placeholder, num);
    }
    r2 = reader(p2);
    int fd2 = one_event(g);
    printf("  a new event (reader 2) gets fd %d in the surviving process (%s the orphan's number)\n", fd2,
           fd2 == num ? "the same as" : "not");
    probe_answer(g, num, PROBE_DENY_ERRNO(EIO));
    printf("  answer fd %d with EIO (meant for the orphan): reader 1: %s;", num, result(r1, 500));
    printf(" reader 2: %s\n", result(r2, 500));
    if (fd2 != num) {
      probe_answer(g, fd2, FAN_ALLOW);
      printf("  answer fd %d with ALLOW: reader 2: %s\n", fd2, result(r2, 2000));
    } else {
      probe_answer(g, num, FAN_ALLOW);
      printf("  answer fd %d again with ALLOW: reader 2: %s\n", num, result(r2, 2000));
    }
    close(fd2);
    if (reserve) { close(num); close(placeholder); }
    close(g);
  }

  printf("== a bounded queue\n");
  const char *knob = "/proc/sys/fs/fanotify/max_queued_events";
  char old[32] = "16384";
  FILE *f = fopen(knob, "r");
  if (f) { if (!fgets(old, sizeof old, f)) strcpy(old, "16384\n"); fclose(f); }
  f = fopen(knob, "w"); fputs("2", f); fclose(f);
  g = group(0);
  f = fopen(knob, "w"); fputs(old, f); fclose(f);
  pid_t rs[5];
  for (int i = 0; i < 5; i++) { newfile(path); rs[i] = reader(path); }
  /* Readers whose event did not fit finish on their own; give them up to 5 s on a busy machine,
   * then a little longer to show that no more do. */
  int done = 0, after = 0;
  for (int t = 0; t < 500; t++) {
    for (int i = 0; i < 5; i++)
      if (rs[i] && strcmp(result(rs[i], 0), "still waiting") != 0) { done++; rs[i] = 0; }
    if (done >= 3 && ++after > 30) break;
    usleep(10000);
  }
  printf("queue limit 2, 5 readers, nothing read yet: %d readers already finished (allowed)\n", done);
  char buf[4096];
  int queued = 0, overflow = 0;
  fcntl(g, F_SETFL, O_NONBLOCK);
  ssize_t n;
  while ((n = read(g, buf, sizeof buf)) > 0)
    for (struct fanotify_event_metadata *m = (void *)buf; FAN_EVENT_OK(m, n); m = FAN_EVENT_NEXT(m, n)) {
      if (m->mask & FAN_Q_OVERFLOW) { overflow++; continue; }
      queued++;
      probe_answer(g, m->fd, FAN_ALLOW);
      close(m->fd);
    }
  printf("  events in the queue: %d, overflow events: %d\n", queued, overflow);
  for (int i = 0; i < 5; i++) if (rs[i]) result(rs[i], 2000);
  close(g);

  printf("== the listener cannot open the event fd\n");
  g = group(FAN_UNLIMITED_QUEUE);
  newfile(path);
  r1 = reader(path);
  usleep(100000);
  struct rlimit rl = {64, 64};
  setrlimit(RLIMIT_NOFILE, &rl);
  int fills[64], nf = 0;
  while (nf < 64 && (fills[nf] = open("/dev/null", O_RDONLY)) >= 0) nf++;
  n = read(g, buf, sizeof buf);
  int rerr = errno;
  for (int i = 0; i < nf; i++) close(fills[i]);
  printf("read(group) with no free fd: %s; reader: %s\n", n < 0 ? probe_errname(rerr) : "returned an event", result(r1, 2000));
  close(g);
  return 0;
}
