#!/usr/bin/env bash
# What filling a small stub costs, against the plain cold read it replaces: on a fresh
# loop filesystem, 1,000 files of 1-64 KiB (fillcost.c), each timed on a freshly mounted
# filesystem (cold inodes): the first read of plain files; a whole-file write into sparse
# files of the same sizes; the same into files that hold a 4 KiB marker of zeros at offset
# 0 like a stub (shared from one template where the filesystem can clone). 3 rounds.
# Usage: tools/probes/fillcost.sh [ext4|xfs|btrfs] [WORK_DIR]   (root)
set -euo pipefail
fs=${1:-xfs} work=${2:-/var/tmp/hsm-fillcost}
here=$(cd "$(dirname "$0")" && pwd)
# Wake-ups of halted vCPUs weigh on the plain read's p50 (wakeups.sh): say how idle CPUs wait.
echo "cpuidle driver: $(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo none)," \
  "guest_halt_poll_ns: $(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns 2>/dev/null || echo absent)"
mkdir -p "$work/mnt"
gcc -O2 -o "$work/fillcost" "$here/fillcost.c"
img=$work/fs.img
rm -f "$img"; truncate -s 6G "$img"
case $fs in
  ext4) mkfs.ext4 -q -F "$img" ;; xfs) mkfs.xfs -q -f "$img" ;; btrfs) mkfs.btrfs -q -f "$img" >/dev/null ;;
  *) echo "unknown filesystem $fs" >&2; exit 2 ;;
esac
mount -o loop "$img" "$work/mnt"
trap 'umount "$work/mnt" 2>/dev/null || true' EXIT
remount() { sync; umount "$work/mnt"; echo 3 >/proc/sys/vm/drop_caches; mount -o loop "$img" "$work/mnt"; }
for round in 1 2 3; do
  for mode in data sparse marker; do
    rm -rf "${work:?}/mnt/$mode"; mkdir "$work/mnt/$mode"
    made=$("$work/fillcost" make "$work/mnt/$mode" $mode)
    remount
    if [ $mode = data ]; then
      echo "$fs round $round, plain files:  $("$work/fillcost" read "$work/mnt/$mode")"
    else
      echo "$fs round $round, $mode files: $("$work/fillcost" fill "$work/mnt/$mode")${made:+ ($made)}"
    fi
  done
done
