#!/bin/sh
# /init of the idhal test vnode (PID 1, busybox sh). Brings the node up the way a real image's
# early boot would (modules, network, state disk), runs the agent once, and reports on the console
# (ttyS0) with one-line markers the test harness waits for:
#   IDHAL-EVENT <what> uptime=<seconds>      progress; `run-exit=N` carries the agent's exit code
#   IDHAL-STATUS <json>                      `idhal-bootstrap status --json`, one line
#   IDHAL-SH <seq> begin | IDHAL-SH <seq> | <line> | IDHAL-SH <seq> truncated | IDHAL-SH <seq> exit=N
#                                            the framed output of the <seq>-th `sh` request
# Then it serves requests, one per line, on the second serial port (ttyS1): `run`, `poweroff`,
# `sh COMMAND` (this init is the TEST vnode's /init only: whoever holds ttyS1 is root here).
# Kernel command line: idhal.server=URL (read by the agent), idhal.period=SECONDS (run again
# every SECONDS when no request comes; default: only on request), idhal.lan=ADDR/PREFIX (the
# address of eth1, a second NIC such as the direct-path tests' LAN; without it eth1 stays down),
# idhal.mode=:
#   (none)  the test vnode described above;
#   bake    copy /bake/* into the image on the first virtio disk, then power off (idhal-image bake);
#   root    mount the image on the first virtio disk and hand over to its /sbin/init (systemd):
#           the helper initramfs a Debian image needs for virtio_blk, with the network already up.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin /var/lib/idhal
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
export PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin

ev() { echo "IDHAL-EVENT $* uptime=$(cut -d' ' -f1 /proc/uptime)"; }
ev init

# Modules in dependency order (listed by idhal-image); ext4 is built into the cloud kernel.
while read -r m; do
    insmod "/lib/modules/$m.ko" || ev "module-failed=$m"
done < /etc/idhal-image/modules

ip link set lo up
# Static user-net address: no DHCP round trip (slirp's network is always 10.0.2.0/24, gw .2).
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
    || ev net-failed
hostname "$(sed -n 's/.*idhal\.name=\([^ ]*\).*/\1/p' /proc/cmdline)" 2>/dev/null

# ADDR/PREFIX with ADDR four decimal octets (0-255, no leading zero) and PREFIX 1-32: checked
# here, so a typo is one clear event instead of whatever busybox ip makes of it.
valid_cidr() {
    case "$1" in */*) ;; *) return 1 ;; esac
    _p=${1#*/}
    case "$_p" in '' | *[!0-9]* | 0*) return 1 ;; esac
    [ ${#_p} -le 2 ] && [ "$_p" -ge 1 ] && [ "$_p" -le 32 ] || return 1
    _a=${1%/*}
    case "$_a" in '' | *[!0-9.]* | *..* | .* | *.) return 1 ;; esac
    _n=0
    for _o in $(echo "$_a" | tr . ' '); do
        case "$_o" in 0?*) return 1 ;; esac
        [ ${#_o} -le 3 ] && [ "$_o" -le 255 ] || return 1
        _n=$((_n + 1))
    done
    [ $_n -eq 4 ]
}

# The second NIC (the direct-path tests' LAN segment), only when idhal.lan= is given.
lan=$(sed -n 's/.*idhal\.lan=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$lan" ]; then
    if ! valid_cidr "$lan"; then
        ev lan-failed
    elif [ ! -e /sys/class/net/eth1 ]; then
        ev lan=no-eth1
    elif ip link set eth1 up && ip addr add "$lan" dev eth1; then
        ev "lan=$lan"
    else
        ev lan-failed
    fi
fi

mode=$(sed -n 's/.*idhal\.mode=\([a-z]*\).*/\1/p' /proc/cmdline)

# The first ext4 file system on the first virtio disk that looks like a root (has /etc). The disk
# and its partitions appear asynchronously after the driver loads: retry, bounded (~5 s).
mount_image() {
    mkdir -p "$1"
    i=0
    while [ $i -lt 100 ]; do
        for d in /dev/vda1 /dev/vda2 /dev/vda3 /dev/vda; do
            [ -b $d ] || continue
            if mount -t ext4 $d "$1" 2>/dev/null; then
                [ -d "$1/etc" ] && { ev "image=$d"; return 0; }
                umount "$1"
            fi
        done
        sleep 0.05
        i=$((i + 1))
    done
    ev image=not-found
    return 1
}

case "$mode" in
    bake)
        # Copy as root, keep symlinks (unit enablement) and modes.
        if mount_image /target && cp -a /bake/. /target/ && sync && umount /target; then
            ev bake=ok
        else
            ev bake=failed
        fi
        poweroff -f
        ;;
    root)
        if mount_image /newroot; then
            ev switch-root
            mount --move /dev /newroot/dev
            umount /sys /proc
            exec switch_root /newroot /sbin/init
        fi
        ev root=failed
        poweroff -f
        ;;
esac

# The state disk is the first virtio disk. Device probing is asynchronous: wait for it, bounded.
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
if mount -t ext4 -o sync /dev/vda /var/lib/idhal; then
    chmod 700 /var/lib/idhal
    ev state-disk=mounted
else
    ev state-disk=missing
fi
ev up

run_agent() {
    ev run-start
    idhal-bootstrap run
    rc=$?
    sync
    ev "run-exit=$rc"
    echo "IDHAL-STATUS $(idhal-bootstrap status --json 2>&1 | tr -d '\n')"
}

shutdown() {
    ev poweroff
    sync
    umount /var/lib/idhal 2>/dev/null
    poweroff -f
}

# `sh COMMAND`: the test harness's shell in the guest. COMMAND runs in a shell of its own with a
# deadline (timeout 60: exit=143 when it fired), stdin from /dev/null, stdout and stderr to one
# file bounded by RLIMIT_FSIZE (a runaway writer is stopped by SIGXFSZ, exit=153; its children
# inherit the limit). Framed on the console: every output line prefixed, CR and ESC replaced, so
# nothing the command prints can pass for a frame line (the harness reads what a terminal shows:
# text after a CR). One request at a time, numbered from 1 in each boot.
SH_MAX=65536
sh_seq=0
run_sh() {
    sh_seq=$((sh_seq + 1))
    _out=/tmp/idhal-sh.out
    # The outer subshell keeps this shell's "File size limit exceeded" report off the console.
    _rc=$( ( (ulimit -f $((SH_MAX / 512 + 1)) && exec timeout 60 sh -c "$1") </dev/null >$_out 2>&1 3<&-
        echo $?) 2>/dev/null)
    echo "IDHAL-SH $sh_seq begin"
    # Tabs too: the harness drops control characters, and `wg show` separates fields with tabs.
    head -c $SH_MAX $_out | tr '\r\033\t' '?? ' | awk -v p="IDHAL-SH $sh_seq | " '{ print p $0 }'
    [ "$(wc -c <$_out)" -gt $SH_MAX ] && echo "IDHAL-SH $sh_seq truncated"
    echo "IDHAL-SH $sh_seq exit=$_rc"
    rm -f $_out
}

run_agent

period=$(sed -n 's/.*idhal\.period=\([0-9]*\).*/\1/p' /proc/cmdline)
ctl=/dev/ttyS1
if [ -c $ctl ] && stty -F $ctl raw -echo 2>/dev/null; then
    exec 3<$ctl
    ev ready
    while :; do
        if [ -n "$period" ]; then
            read -t "$period" -r cmd <&3 || cmd=run
        else
            read -r cmd <&3 || { sleep 1; continue; }
        fi
        case "$cmd" in
            run) run_agent ;;
            poweroff) shutdown ;;
            "sh "*) run_sh "${cmd#sh }" ;;
            "") ;;
            *) ev "unknown-request=$cmd" ;;
        esac
    done
fi
# No control port: behave like a plain node (periodic runs if asked, else idle).
ev ready
while :; do
    sleep "${period:-3600}"
    [ -n "$period" ] && run_agent
done
