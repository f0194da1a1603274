// The cost of one FAN_PRE_ACCESS round trip on a first read: the floor under any
// user-space HSM's first-byte latency (docs/BENCHMARKS.md, "first-byte latency").
//
//   roundtrip read DIR          open + read 1 byte of every file in DIR, in name order;
//                               prints p50 and p99 in microseconds
//   roundtrip listen DIR READY  a pre-content listener on DIR's filesystem that answers
//                               every event FAN_ALLOW at once (no fill); touches READY
//                               when its mark is in place; runs until killed
//
// tools/probes/roundtrip.sh runs both on a fresh loop filesystem (see there).
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fanotify.h>
#include <time.h>
#include <unistd.h>

#ifndef FAN_PRE_ACCESS
#define FAN_PRE_ACCESS 0x00100000
#endif
#ifndef FAN_CLASS_PRE_CONTENT
#define FAN_CLASS_PRE_CONTENT 0x00000008
#endif

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
static int cmps(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int do_read(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) { perror(dir); return 1; }
    char **names = NULL; size_t n = 0, cap = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.') continue;
        if (n == cap) names = realloc(names, (cap = cap ? cap * 2 : 1024) * sizeof *names);
        names[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof *names, cmps);
    double *lat = malloc(n * sizeof *lat);
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    for (size_t i = 0; i < n; i++) {
        struct timespec a, b; char c;
        clock_gettime(CLOCK_MONOTONIC, &a);
        int fd = openat(dfd, names[i], O_RDONLY);
        if (fd < 0 || read(fd, &c, 1) != 1) { perror(names[i]); return 1; }
        close(fd);
        clock_gettime(CLOCK_MONOTONIC, &b);
        lat[i] = (b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3;
    }
    qsort(lat, n, sizeof *lat, cmp);
    printf("%zu files: p50 %.1f us, p99 %.1f us\n", n, lat[n / 2], lat[n * 99 / 100]);
    return 0;
}

static int do_listen(const char *dir, const char *ready) {
    int g = fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC, O_RDONLY | O_LARGEFILE);
    if (g < 0) { perror("fanotify_init"); return 1; }
    if (fanotify_mark(g, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_PRE_ACCESS, AT_FDCWD, dir)) {
        perror("fanotify_mark"); return 1;
    }
    close(open(ready, O_CREAT | O_WRONLY, 0600));
    char buf[8192] __attribute__((aligned(8)));
    for (;;) {
        ssize_t len = read(g, buf, sizeof buf);
        if (len <= 0) { if (errno == EINTR) continue; perror("read"); return 1; }
        for (struct fanotify_event_metadata *m = (void *)buf; FAN_EVENT_OK(m, len);
             m = FAN_EVENT_NEXT(m, len)) {
            struct fanotify_response r = {.fd = m->fd, .response = FAN_ALLOW};
            if (write(g, &r, sizeof r) != sizeof r) perror("write");
            close(m->fd);
        }
    }
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "read")) return do_read(argv[2]);
    if (argc == 4 && !strcmp(argv[1], "listen")) return do_listen(argv[2], argv[3]);
    fprintf(stderr, "usage: roundtrip read DIR | roundtrip listen DIR READY\n");
    return 2;
}
