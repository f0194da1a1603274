/* probe-access OP FILE EXPECTED: do one access and compare what it saw with EXPECTED's bytes.
 * OP: read (whole file with read()), mmap (whole file, MAP_PRIVATE), append (append "x", then
 * read it all back: the expected bytes plus "x"). Prints "right bytes", "zeros", "wrong bytes"
 * or the errno's name. */
#include "probe.h"
#include <sys/mman.h>

static char *slurp(const char *p, size_t *len) {
  int fd = open(p, O_RDONLY);
  struct stat st;
  if (fd < 0 || fstat(fd, &st)) return NULL;
  char *b = malloc(st.st_size + 2);
  ssize_t n = pread(fd, b, st.st_size, 0);
  close(fd);
  *len = n < 0 ? 0 : n;
  return b;
}
static void verdict(const char *got, size_t n, const char *want, size_t wn) {
  if (n == wn && !memcmp(got, want, n)) { puts("right bytes"); return; }
  size_t z = 0;
  while (z < n && !got[z]) z++;
  puts(z == n ? "zeros" : "wrong bytes");
}
int main(int argc, char **argv) {
  if (argc < 4) { fprintf(stderr, "usage: probe-access read|mmap|append FILE EXPECTED\n"); return 2; }
  size_t wn;
  char *want = slurp(argv[3], &wn);
  if (!want) { perror(argv[3]); return 2; }
  const char *op = argv[1];
  if (!strcmp(op, "append")) {
    int fd = open(argv[2], O_WRONLY | O_APPEND);
    if (fd < 0 || write(fd, "x", 1) != 1) { puts(probe_errname(errno)); return 1; }
    close(fd);
    want[wn++] = 'x';
    op = "read";
  }
  int fd = open(argv[2], O_RDONLY);
  if (fd < 0) { puts(probe_errname(errno)); return 1; }
  char *got = malloc(wn + 1);
  size_t n = 0;
  if (!strcmp(op, "read")) {
    ssize_t r;
    while (n < wn + 1 && (r = read(fd, got + n, wn + 1 - n)) > 0) n += r;
    if (r < 0) { puts(probe_errname(errno)); return 1; }
  } else {
    char *p = mmap(NULL, wn, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) { puts(probe_errname(errno)); return 1; }
    memcpy(got, p, wn);
    n = wn;
  }
  verdict(got, n, want, wn);
  return 0;
}
