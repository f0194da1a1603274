# shellcheck shell=bash
# Shared helpers for tools/vm/*. Sourced, not run.
#
# Every failure is loud: a VM lane that cannot run must fail with the reason, never pass.

# shellcheck disable=SC2034  # used by the scripts that source this
vm_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$vm_dir/../.." && pwd)
# shellcheck disable=SC2034
cache=${HSM_VM_CACHE:-/var/cache/hsm-vm}
# shellcheck disable=SC2034
mirror=${HSM_VM_MIRROR:-http://deb.debian.org/debian}
# shellcheck disable=SC2034
keyring=${HSM_VM_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}

die() { echo "hsm-vm: $*" >&2; exit 1; }
note() { echo "hsm-vm: $*" >&2; }

# need CMD PACKAGE: fail naming the Debian package that provides CMD.
need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found: apt-get install $2"
}

need_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root ($*); nothing was run"
}

# cache_lock: hold an exclusive lock on the cache for the rest of the script, so that two
# runs sharing a cache never build the same kernel or root image at once.
cache_lock() {
  mkdir -p "$cache" || die "cannot create the cache directory $cache (set HSM_VM_CACHE)"
  [ -w "$cache" ] || die "cache directory $cache is not writable (set HSM_VM_CACHE)"
  exec {cache_lock_fd}>"$cache/.lock"
  flock "$cache_lock_fd"
}

# cache_unlock: let other runs build while this one boots.
cache_unlock() {
  exec {cache_lock_fd}>&-
}
