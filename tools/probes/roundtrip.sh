#!/usr/bin/env bash
# The floor under first-byte latency: a cold first read of 1,000 small files (1-64 KiB,
# like hsm-bench's latency test) with no listener, then with a pre-content listener that
# answers FAN_ALLOW at once and fetches nothing. Each side on a freshly mounted loop
# filesystem (cold inodes and data), 3 rounds each, alternating.
# Usage: tools/probes/roundtrip.sh [ext4|xfs|btrfs] [WORK_DIR]   (root)
set -euo pipefail
fs=${1:-ext4} work=${2:-/var/tmp/hsm-roundtrip}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work/mnt"
gcc -O2 -o "$work/roundtrip" "$here/roundtrip.c"
img=$work/fs.img
rm -f "$img"; truncate -s 1G "$img"
case $fs in
  ext4) mkfs.ext4 -q -F "$img" ;; xfs) mkfs.xfs -q -f "$img" ;; btrfs) mkfs.btrfs -q -f "$img" >/dev/null ;;
  *) echo "unknown filesystem $fs" >&2; exit 2 ;;
esac
mount -o loop "$img" "$work/mnt"
trap 'kill $lp 2>/dev/null || true; umount "$work/mnt" 2>/dev/null || true' EXIT
lp=""
python3 - "$work/mnt/f" <<'PY'
import os, random, sys
r = random.Random(11); os.makedirs(sys.argv[1])
for i in range(1000):
    open(os.path.join(sys.argv[1], f"{i:04d}"), "wb").write(r.randbytes(r.randint(1024, 65536)))
PY
remount() { umount "$work/mnt"; echo 3 >/proc/sys/vm/drop_caches; mount -o loop "$img" "$work/mnt"; }
for round in 1 2 3; do
  remount
  echo "$fs round $round, no listener:      $("$work/roundtrip" read "$work/mnt/f")"
  remount
  rm -f "$work/ready"
  "$work/roundtrip" listen "$work/mnt" "$work/ready" & lp=$!
  while [ ! -e "$work/ready" ]; do sleep 0.05; done
  echo "$fs round $round, allow-only listener: $("$work/roundtrip" read "$work/mnt/f")"
  kill $lp; wait $lp 2>/dev/null || true; lp=""
done
