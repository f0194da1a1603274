// What filling a small stub costs the kernel, against the plain cold read it replaces
// (docs/BENCHMARKS.md, "2026-12-05 (sixth)"). fillcost.sh drives it on a fresh filesystem.
//
//   fillcost make DIR MODE   1,000 files of 1-64 KiB (seeded sizes): MODE "data" writes
//                            random bytes (the plain copy), "sparse" only sets the size,
//                            "marker" sets the size and puts a 4 KiB block of zeros at
//                            offset 0 the way populate does (cloned from one template with
//                            FICLONERANGE where the filesystem shares blocks, else written)
//   fillcost read DIR        open + read 1 byte + close of each file, in name order
//   fillcost fill DIR        open O_RDWR + pwrite of the whole file from memory + close
//                            of each (the agent's fill of a small stub, less the fetch)
// read and fill print p50 and p99 in microseconds.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define N 1000
static char buf[65536];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}
static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
static void report(const char *what, double *lat) {
    qsort(lat, N, sizeof *lat, cmp);
    printf("%s: p50 %.1f us, p99 %.1f us\n", what, lat[N / 2], lat[N * 99 / 100]);
}
static void path(char *p, const char *dir, int i) { snprintf(p, 4096, "%s/%04d", dir, i); }

static int make(const char *dir, const char *mode) {
    char p[4096];
    int tmpl = -1, cloned = 0;
    if (!strcmp(mode, "marker")) {
        tmpl = open(dir, O_TMPFILE | O_RDWR, 0600);
        if (tmpl < 0 || pwrite(tmpl, buf, 4096, 0) != 4096 || fsync(tmpl)) { perror("template"); return 1; }
    }
    srand(7);
    for (int i = 0; i < N; i++) {
        off_t size = 1024 + rand() % (64 * 1024 - 1024);
        path(p, dir, i);
        int fd = open(p, O_RDWR | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) { perror(p); return 1; }
        if (!strcmp(mode, "data")) {
            for (size_t j = 0; j < sizeof buf; j++) buf[j] = rand();
            if (pwrite(fd, buf, size, 0) != size) { perror(p); return 1; }
            memset(buf, 0, sizeof buf);
        } else {
            if (ftruncate(fd, size)) { perror(p); return 1; }
            if (tmpl >= 0) {
                struct file_clone_range r = { .src_fd = tmpl, .src_offset = 0, .src_length = 4096, .dest_offset = 0 };
                if (size >= 4096 && ioctl(fd, FICLONERANGE, &r) == 0) cloned++;
                else if (pwrite(fd, buf, size < 4096 ? size : 4096, 0) < 0) { perror(p); return 1; }
            }
        }
        close(fd);
    }
    if (tmpl >= 0) printf("markers: %d of %d cloned from the template, the rest written\n", cloned, N);
    return 0;
}

static int run(const char *dir, int fill) {
    char p[4096], c;
    double lat[N];
    for (size_t j = 0; j < sizeof buf; j++) buf[j] = j * 7;
    for (int i = 0; i < N; i++) {
        path(p, dir, i);
        double a = now();
        int fd = open(p, fill ? O_RDWR : O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st)) { perror(p); return 1; }
        if (fill ? pwrite(fd, buf, st.st_size, 0) != st.st_size : read(fd, &c, 1) != 1) { perror(p); return 1; }
        close(fd);
        lat[i] = now() - a;
    }
    report(fill ? "fill (open, pwrite all, close)" : "first read (open, read 1 byte, close)", lat);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "make")) return make(argv[2], argv[3]);
    if (argc == 3 && !strcmp(argv[1], "read")) return run(argv[2], 0);
    if (argc == 3 && !strcmp(argv[1], "fill")) return run(argv[2], 1);
    fprintf(stderr, "usage: fillcost make DIR data|sparse|marker | fillcost read DIR | fillcost fill DIR\n");
    return 2;
}
