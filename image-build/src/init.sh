#!/bin/sh
# /init of the idhal test vnode (PID 1, busybox sh). Brings the node up the way a real image's
# early boot would (modules, network, state disk), runs the agent once, and reports on the console
# (ttyS0) with one-line markers the test harness waits for:
#   IDHAL-EVENT <what> uptime=<seconds>      progress; `run-exit=N` carries the agent's exit code
#   IDHAL-STATUS <json>                      `idhal-bootstrap status --json`, one line
# Then it serves requests, one per line, on the second serial port (ttyS1): `run`, `poweroff`.
# Kernel command line: idhal.server=URL (read by the agent), idhal.period=SECONDS (run again
# every SECONDS when no request comes; default: only on request), idhal.mode=:
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
