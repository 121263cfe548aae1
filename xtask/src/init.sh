#!/bin/busybox sh
# /init of ferrovisor's Linux guest initramfs, written by `cargo xtask guest`.
#
# Mounts proc, sys and devtmpfs and says "ferro-init: up". With `ferro.cmd=1` on the
# kernel command line and a /ferro/cmd file (a second cpio archive appended to the
# initramfs by `cargo xtask run -- CMD`), it runs that file with sh, prints
# "FERRO-EXIT <status>" and powers off; otherwise it starts a shell on the console and
# powers off when the shell exits. It never loads xen-netfront (insmod waits for a
# backend for minutes when there is none): the module only sits in /lib/modules.

/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=linux PS1='ferro:\w# '

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
ip link set lo up 2>/dev/null
cd /root

echo "ferro-init: up (Linux $(uname -r), $(cut -d' ' -f1 /proc/uptime) s after kernel start)"

cmd_mode=0
for word in $(cat /proc/cmdline); do
    [ "$word" = ferro.cmd=1 ] && cmd_mode=1
done

if [ "$cmd_mode" = 1 ] && [ -f /ferro/cmd ]; then
    # Kernel messages would land in the middle of the command's output: keep only
    # emergencies on the console (dmesg still has everything).
    dmesg -n 1
    echo "ferro-init: running command"
    sh /ferro/cmd </dev/null 2>&1
    status=$?
    echo "FERRO-EXIT $status"
    poweroff -f
fi

[ "$cmd_mode" = 1 ] && echo "ferro-init: ferro.cmd=1 but there is no /ferro/cmd"
echo "ferro-init: shell on the console; 'exit' or 'poweroff -f' powers off"
# cttyhack opens the real console device (hvc0, ttyS0) as the controlling terminal, so
# the shell has job control and Ctrl-C works.
setsid cttyhack sh
poweroff -f
