#!/usr/bin/env bash
# paths.sh DIR: the ways a reader can reach a stub, with the fill design the agent uses
# (read-only event fds; fills by handle through a private clone mount with a mount ignore mark).
# DIR is an empty directory on ext4, xfs or btrfs; needs root, gcc (with static glibc), setfattr.
# Builds the probes into a temporary directory, mounts an overlay and a read-only bind mount
# under DIR, and prints one deterministic line per fact. PROBE_VERBOSE=1 also prints the
# listeners' logs (every event, with the kind of mount it came through) to stderr.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "${1:?usage: paths.sh DIR}" && pwd)
bin=$(mktemp -d /tmp/hsm-probes.XXXXXX)
src=$bin/src
mkdir -p "$src" "$root/lower" "$root/upper" "$root/work" "$root/merged" "$root/robind"
listener_pid=""
cleanup() {
  [ -n "$listener_pid" ] && kill -KILL "$listener_pid" 2>/dev/null && wait "$listener_pid" 2>/dev/null
  umount "$root/merged" 2>/dev/null; umount "$root/robind" 2>/dev/null
  rm -rf "$bin"
}
trap cleanup EXIT

for p in paths-listener probe-access; do
  gcc -O1 -o "$bin/$p" "$here/$p.c" || { echo "cannot build $p"; exit 1; }
done
gcc -O1 -static -o "$src/hello" "$here/hello.c" || { echo "cannot build a static hello (libc6-dev)"; exit 1; }
head -c 20000 /dev/urandom >"$src/data"

# stub NAME KIND: a sparse file the size of its source, marked with user.probe.stub, with the
# source's bytes in $src/NAME. Made before the listener starts.
stub() {
  cp "$src/$2" "$src/$1"
  truncate -s "$(stat -c %s "$src/$1")" "$root/lower/$1"
  [ "$2" = hello ] && chmod 755 "$root/lower/$1"
  setfattr -n user.probe.stub -v 1 "$root/lower/$1"
}
for n in rw-robind rw-ovl r-direct r-robind r-ns r-ovl r-mmap r-ovlmmap r-cu o-ovlmmap o-cu n-direct; do stub "$n" data; done
for n in r-exec r-ovlexec o-ovlexec; do stub "$n" hello; done

mount -t overlay overlay -o "lowerdir=$root/lower,upperdir=$root/upper,workdir=$root/work" "$root/merged" || exit 1
mount --bind -o ro "$root/lower" "$root/robind" || exit 1

start() {
  log=$bin/listener-$1.log
  "$bin/paths-listener" "$root" "$src" "$1" >"$log" 2>&1 &
  listener_pid=$!
  for _ in $(seq 100); do grep -q '^ready' "$log" && return 0; sleep 0.05; done
  echo "listener ($1) did not start:"; cat "$log"; exit 1
}
stop() {
  kill -KILL "$listener_pid"; wait "$listener_pid" 2>/dev/null; listener_pid=""
  [ "${PROBE_VERBOSE:-0}" = 1 ] && { echo "--- listener log ($1)"; cat "$log"; } >&2
}
acc() { timeout 10 "$bin/probe-access" "$1" "$2" "$src/$(basename "$2")"; }
# mount_of KIND NAME: the kind of mount (visible/hidden to the opener) of the first KIND event on NAME
mount_of() { grep -m1 "^$1 $2 " "$log" | sed -n 's/.*mount=\([a-z]*\).*/\1/p'; }
has() { grep -q "^$1 $2 " "$log" && echo yes || echo no; }
run_exec() { out=$(timeout 10 "$1" 2>/dev/null); [ "$out" = "hello from a stub" ] && echo "ran" || echo "failed"; }

echo "== read-write event fds (fanotify_init O_RDWR)"
start rw
echo "read through a read-only bind mount: $(acc read "$root/robind/rw-robind")"
echo "read through an overlay lower layer: $(acc read "$root/merged/rw-ovl")"
echo "listener's read(group): $(grep -m1 -o 'read(group): [A-Z]*' "$log" | cut -d' ' -f2 || true)"
stop rw

echo "== read-only event fds, range-by-range fills through the clone mount"
start range
sed -n '/^open_by_handle_at\|^fanotify_mark\|^mount ignore/p' "$log"
echo "direct read: $(acc read "$root/lower/r-direct") (OPEN_PERM mount: $(mount_of OPEN_PERM r-direct))"
echo "read through a read-only bind mount: $(acc read "$root/robind/r-robind") (OPEN_PERM mount: $(mount_of OPEN_PERM r-robind))"
echo "read from another mount namespace: $(unshare -m timeout 10 "$bin/probe-access" read "$root/lower/r-ns" "$src/r-ns") (OPEN_PERM mount: $(mount_of OPEN_PERM r-ns))"
echo "read through overlayfs: $(acc read "$root/merged/r-ovl") (OPEN_PERM mount: $(mount_of OPEN_PERM r-ovl); PRE_ACCESS: $(has PRE_ACCESS r-ovl))"
echo "direct mmap: $(acc mmap "$root/lower/r-mmap") (PRE_ACCESS: $(has PRE_ACCESS r-mmap))"
echo "mmap through overlayfs: $(acc mmap "$root/merged/r-ovlmmap") (OPEN_PERM: $(has OPEN_PERM r-ovlmmap), mount: $(mount_of OPEN_PERM r-ovlmmap); PRE_ACCESS: $(has PRE_ACCESS r-ovlmmap))"
echo "append through overlayfs (copy-up): $(acc append "$root/merged/r-cu") (PRE_ACCESS during copy-up: $(has PRE_ACCESS r-cu))"
echo "direct exec: $(run_exec "$root/lower/r-exec")"
echo "  events in order: $(grep -E "^[A-Z_]+ r-exec " "$log" | awk '{print $1}' | uniq | xargs)"
echo "  open O_RDWR by handle during OPEN_EXEC_PERM: $(grep -A1 '^OPEN_EXEC_PERM r-exec ' "$log" | sed -n 's/.*during this event: //p' | head -1)"
echo "  open O_RDWR by handle during the PRE_ACCESS of a mapping: $(grep -A1 '^PRE_ACCESS r-exec ' "$log" | sed -n 's/.*during this event: //p' | sort -u | xargs)"
# exec reads the ELF header and program headers (two reads of page 0), then maps each segment.
segs() { [ "$(grep -c "^PRE_ACCESS $1 " "$log")" -gt 2 ] && echo yes || echo no; }
echo "  PRE_ACCESS for the mapped segments (beyond the two header reads): $(segs r-exec)"
echo "exec through overlayfs: $(run_exec "$root/merged/r-ovlexec") (OPEN_EXEC_PERM mount: $(mount_of OPEN_EXEC_PERM r-ovlexec); PRE_ACCESS for the mapped segments: $(segs r-ovlexec))"
stop range

echo "== as above, and a stub opened through a hidden mount is hydrated at FAN_OPEN_PERM"
start open
echo "mmap through overlayfs: $(acc mmap "$root/merged/o-ovlmmap")"
echo "exec through overlayfs: $(run_exec "$root/merged/o-ovlexec")"
echo "append through overlayfs (copy-up): $(acc append "$root/merged/o-cu")"
stop open

echo "== no ignore mark on the clone mount (single-threaded listener)"
start noignore
timeout 30 "$bin/probe-access" read "$root/lower/n-direct" "$src/n-direct" >"$bin/n.out" &
reader=$!
sleep 3
if kill -0 "$reader" 2>/dev/null; then echo "reader still waiting after 3 s: yes"; else echo "reader still waiting after 3 s: no"; fi
echo "listener waiting in: $(cat "/proc/$listener_pid/wchan") (its own open by handle raised FAN_OPEN_PERM to itself)"
stop noignore
wait "$reader"
echo "after the listener is killed the reader got: $(cat "$bin/n.out")"
