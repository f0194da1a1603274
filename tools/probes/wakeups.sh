#!/usr/bin/env bash
# What a pre-content round trip costs with the reader and the listener on the same CPU, on
# different CPUs, and on different CPUs with the guest's halt polling on. On a VM whose
# idle vCPUs halt at once (cpuidle-haltpoll with guest_halt_poll_ns=0, as on this project's
# machines), waking a thread on a halted vCPU costs a VM exit and re-entry; a round trip
# wakes the listener and then the reader, so where the scheduler placed the two decides
# the first-byte latency (docs/BENCHMARKS.md, "2026-12-05 (sixth)").
#
# A cold first read of 1,000 small files on a freshly mounted filesystem, 3 rounds per
# placement: no listener; an allow-only listener (roundtrip.c) on the reader's CPU; on the
# other CPU; on the other CPU with guest_halt_poll_ns set to 200000 for that run only (put
# back on exit; skipped where the haltpoll module is absent). Needs 2 or more CPUs.
# Usage: tools/probes/wakeups.sh [ext4|xfs|btrfs] [WORK_DIR]   (root)
set -euo pipefail
fs=${1:-xfs} work=${2:-/var/tmp/hsm-wakeups}
here=$(cd "$(dirname "$0")" && pwd)
[ "$(nproc)" -ge 2 ] || { echo "wakeups.sh needs 2 CPUs" >&2; exit 2; }
poll=/sys/module/haltpoll/parameters/guest_halt_poll_ns
echo "cpuidle driver: $(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo none)," \
  "guest_halt_poll_ns: $(cat $poll 2>/dev/null || echo absent)"
mkdir -p "$work/mnt"
gcc -O2 -o "$work/roundtrip" "$here/roundtrip.c"
img=$work/fs.img
rm -f "$img"; truncate -s 2G "$img"
case $fs in
  ext4) mkfs.ext4 -q -F "$img" ;; xfs) mkfs.xfs -q -f "$img" ;; btrfs) mkfs.btrfs -q -f "$img" >/dev/null ;;
  *) echo "unknown filesystem $fs" >&2; exit 2 ;;
esac
mount -o loop "$img" "$work/mnt"
old_poll=$(cat $poll 2>/dev/null || true)
lp=""
cleanup() {
  [ -n "$lp" ] && kill "$lp" 2>/dev/null || true
  [ -n "$old_poll" ] && echo "$old_poll" > $poll
  umount "$work/mnt" 2>/dev/null || true
}
trap cleanup EXIT
python3 - "$work/mnt/f" <<'PY'
import os, random, sys
r = random.Random(11); os.makedirs(sys.argv[1])
for i in range(1000):
    open(os.path.join(sys.argv[1], f"{i:04d}"), "wb").write(r.randbytes(r.randint(1024, 65536)))
PY
remount() { umount "$work/mnt"; echo 3 >/proc/sys/vm/drop_caches; mount -o loop "$img" "$work/mnt"; }
# listen_on CPU|none: one round, the reader on CPU 0.
round() {
  remount
  if [ "$1" = none ]; then taskset -c 0 "$work/roundtrip" read "$work/mnt/f"; return; fi
  rm -f "$work/ready"
  taskset -c "$1" "$work/roundtrip" listen "$work/mnt" "$work/ready" & lp=$!
  while [ ! -e "$work/ready" ]; do sleep 0.05; done
  taskset -c 0 "$work/roundtrip" read "$work/mnt/f"
  kill $lp; wait $lp 2>/dev/null || true; lp=""
}
for round in 1 2 3; do
  echo "$fs round $round, no listener:                 $(round none)"
  echo "$fs round $round, listener on the reader's CPU: $(round 0)"
  echo "$fs round $round, listener on the other CPU:    $(round 1)"
  if [ -n "$old_poll" ]; then
    echo 200000 > $poll
    echo "$fs round $round, other CPU, halt polling on:   $(round 1)"
    echo "$old_poll" > $poll
  fi
done
