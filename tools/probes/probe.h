/* Shared definitions for the kernel probes in tools/probes (see README.md).
 * The constants are defined here because Debian 12's <linux/fanotify.h> predates them. */
#ifndef HSM_PROBE_H
#define HSM_PROBE_H
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fanotify.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef FAN_CLASS_PRE_CONTENT
#define FAN_CLASS_PRE_CONTENT 0x08
#endif
#ifndef FAN_PRE_ACCESS
#define FAN_PRE_ACCESS 0x00100000
#endif
#ifndef FAN_MARK_IGNORE
#define FAN_MARK_IGNORE 0x00000400
#endif
#ifndef FAN_MARK_IGNORE_SURV
#define FAN_MARK_IGNORE_SURV (FAN_MARK_IGNORE | FAN_MARK_IGNORED_SURV_MODIFY)
#endif
#ifndef FAN_MARK_EVICTABLE
#define FAN_MARK_EVICTABLE 0x00000200
#endif
#ifndef FAN_MARK_MNTNS
#define FAN_MARK_MNTNS 0x00000110
#endif
#ifndef FAN_REPORT_FID
#define FAN_REPORT_FID 0x00000200
#endif
#define PROBE_INFO_TYPE_RANGE 6
#define PROBE_DENY_ERRNO(e) (FAN_DENY | ((uint32_t)(e) << 24))

/* The range record that follows the 24-byte event metadata (info type 6, 24 bytes). */
struct probe_range {
  uint8_t info_type, pad;
  uint16_t len;
  uint32_t pad2;
  uint64_t offset, count;
};

/* Walk an event's info records by their length; returns 1 and the range if one is present. */
static inline int probe_event_range(const struct fanotify_event_metadata *m, uint64_t *off, uint64_t *cnt) {
  const char *p = (const char *)m + m->metadata_len, *end = (const char *)m + m->event_len;
  while (p + 4 <= end) {
    const struct probe_range *r = (const void *)p;
    if (r->len == 0) break;
    if (r->info_type == PROBE_INFO_TYPE_RANGE && r->len >= sizeof *r) {
      *off = r->offset;
      *cnt = r->count;
      return 1;
    }
    p += r->len;
  }
  return 0;
}

static inline const char *probe_kind(uint64_t mask) {
  if (mask & FAN_PRE_ACCESS) return "PRE_ACCESS";
  if (mask & FAN_OPEN_EXEC_PERM) return "OPEN_EXEC_PERM";
  if (mask & FAN_OPEN_PERM) return "OPEN_PERM";
  if (mask & FAN_ACCESS_PERM) return "ACCESS_PERM";
  return "other";
}

static inline const char *probe_errname(int e) {
  switch (e) {
  case 0: return "ok";
  case EIO: return "EIO";
  case EPERM: return "EPERM";
  case EBUSY: return "EBUSY";
  case ETXTBSY: return "ETXTBSY";
  case EAGAIN: return "EAGAIN";
  case ENOSPC: return "ENOSPC";
  case EDQUOT: return "EDQUOT";
  case ENOENT: return "ENOENT";
  case EINVAL: return "EINVAL";
  case EROFS: return "EROFS";
  case EACCES: return "EACCES";
  case EBADF: return "EBADF";
  case EOPNOTSUPP: return "EOPNOTSUPP";
  case EMFILE: return "EMFILE";
  case ENOMEM: return "ENOMEM";
  case EXDEV: return "EXDEV";
  default: return strerror(e);
  }
}

static inline void probe_answer(int g, int fd, uint32_t response) {
  struct fanotify_response r = {.fd = fd, .response = response};
  if (write(g, &r, sizeof r) != sizeof r) printf("  response write failed: %s\n", probe_errname(errno));
}
#endif
