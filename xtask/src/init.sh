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
mkdir -p /tmp /root
cd /root

# xenstore-read PATH: one XS_READ through the kernel's xenbus device, like Xen's tool
# of that name (a relative PATH is under this domain's /local/domain/<domid>).
cat > /bin/xenstore-read <<'XSREAD'
#!/bin/busybox sh
[ "$#" = 1 ] && [ -n "$1" ] || { echo "usage: xenstore-read PATH" >&2; exit 2; }
len=$(( ${#1} + 1 ))
[ "$len" -le 4096 ] || { echo "xenstore-read: path longer than 4095 bytes" >&2; exit 2; }
byte() { printf "\\$(printf %03o $(( $1 & 255 )))"; }
f=/tmp/xsread.$$
{
    # header: type XS_READ (2), req_id 1, tx_id 0, payload length; then PATH and a NUL
    printf '\002\000\000\000\001\000\000\000\000\000\000\000'
    byte "$len"; byte $(( len >> 8 )); printf '\000\000'
    printf '%s\000' "$1"
} > "$f.req"
exec 3<>/dev/xen/xenbus || exit 1
cat "$f.req" >&3
dd bs=4200 count=1 <&3 2>/dev/null > "$f"
exec 3>&-
type=$(head -c 1 "$f" | od -An -tu1 | tr -d ' ')
if [ "$type" = 2 ]; then
    tail -c +17 "$f"; echo
    rm -f "$f" "$f.req"; exit 0
fi
echo "xenstore-read: $1: $(tail -c +17 "$f" | tr -d '\000')" >&2
rm -f "$f" "$f.req"; exit 1
XSREAD
chmod +x /bin/xenstore-read

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
