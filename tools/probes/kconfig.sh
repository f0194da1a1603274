#!/bin/sh
# kconfig.sh: the kernel build options the project depends on, from /proc/config.gz.
# Prints the kernel release and one line per option (missing options print nothing).
uname -r
zcat /proc/config.gz 2>/dev/null | grep -E '^(# )?CONFIG_(FANOTIFY|FANOTIFY_ACCESS_PERMISSIONS|BPF_LSM|LSM|KPROBES|DEBUG_INFO_BTF|OVERLAY_FS)[= ]' \
  || echo "no /proc/config.gz: look at /boot/config-$(uname -r)"
