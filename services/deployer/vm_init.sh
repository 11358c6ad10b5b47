#!/bin/sh
# PID 1 of an App VM, run by the platform's static busybox.
#
# Loads the drivers, mounts the image's disk at /newroot, sets up the network
# QEMU's user-mode stack expects, then runs the image's command inside the
# image's root with its env and working directory. When the command ends or
# the power button is pressed, it stops what is left, makes the disk read-only
# and powers off. It never halts: a halted guest keeps QEMU running.
#
# The per-deploy settings come from /crabglamp/config.sh, appended to the
# initramfs at boot: PORT, WORKDIR, APP_ARGV and APP_ENV, the last two as
# words quoted for sh.

export PATH=/bin

say() {
    echo "crabglamp: $*"
}

power_off() {
    # Nothing may hold a file open for writing when the disk goes read-only
    kill -TERM -1 2>/dev/null
    sleep 0.1
    kill -KILL -1 2>/dev/null
    for mounted in dev/shm dev/pts dev proc sys; do
        umount "/newroot/$mounted" 2>/dev/null
    done
    sync
    mount -o remount,ro /newroot 2>/dev/null
    poweroff -f
    # Only reached if the power-off failed; a crash still ends the VM
    echo o >/proc/sysrq-trigger
    echo c >/proc/sysrq-trigger
}

give_up() {
    say "boot failed: $*"
    power_off
}

wait_for_device() {
    tries=0
    while [ ! -e "$1" ] && [ "$tries" -lt 200 ]; do
        sleep 0.02
        tries=$((tries + 1))
    done
    [ -e "$1" ]
}

watch_power_button() {
    # A read of one input event from the ACPI button means it was pressed
    for name in /sys/class/input/event*/device/name; do
        [ "$(cat "$name" 2>/dev/null)" = "Power Button" ] || continue
        event=${name#/sys/class/input/}
        event=/dev/input/${event%%/*}
        (
            wait_for_device "$event" &&
                dd if="$event" of=/dev/null bs=24 count=1 2>/dev/null &&
                kill -USR1 1
        ) &
    done
}

is_listening() {
    for table in /proc/net/tcp /proc/net/tcp6; do
        [ -r "$table" ] || continue
        while read -r _ local _ state _; do
            [ "$state" = 0A ] && [ "${local##*:}" = "$1" ] && return 0
        done <"$table"
    done
    return 1
}

watch_listening() {
    # Tells the host, through the console, when the App's port is open
    hex=$(printf '%04X' "$PORT")
    delay=0.1
    checks=0
    until is_listening "$hex"; do
        sleep "$delay"
        checks=$((checks + 1))
        [ "$checks" -eq 300 ] && delay=2
    done
    say "listening on $PORT"
}

on_power_button() {
    interrupted=1
    say "power button pressed: stopping the app"
    kill -TERM "$APP" 2>/dev/null
    (
        sleep 5
        kill -KILL "$APP" 2>/dev/null
    ) &
}

run_app() {
    # nsenter changes root and directory without needing a shell in the image
    eval "exec env -i $APP_ENV /bin/nsenter -r/newroot \"-w/newroot\$WORKDIR\"" \
        "-- $APP_ARGV"
}

mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys

case " $(cat /proc/cmdline) " in
*" crabglamp.probe "*)
    say "probe ok"
    poweroff -f
    ;;
esac

while read -r module; do
    insmod "/lib/modules/$module.ko" || say "cannot load module $module"
done </etc/crabglamp/modules
# The modules are loaded: their files only take guest memory now
rm -rf /lib/modules

[ -r /crabglamp/config.sh ] || give_up "no deploy config in the initramfs"
. /crabglamp/config.sh

wait_for_device /dev/vda || give_up "no disk /dev/vda"
mount -t ext4 /dev/vda /newroot || give_up "cannot mount the image's disk"

ip link set lo up
{
    ip link set eth0 up &&
        ip addr add 10.0.2.15/24 dev eth0 &&
        ip route add default via 10.0.2.2
} || say "network not configured"

mkdir -p /newroot/etc /newroot/proc /newroot/sys /newroot/dev
rm -f /newroot/etc/resolv.conf
echo "nameserver 10.0.2.3" >/newroot/etc/resolv.conf
[ -e /newroot/etc/hosts ] || printf '127.0.0.1 localhost\n::1 localhost\n' \
    >/newroot/etc/hosts
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -o bind /dev /newroot/dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm

watch_power_button
trap on_power_button USR1
say "starting $APP_ARGV"
run_app &
APP=$!
watch_listening &

# A trapped signal cuts wait short with its own status: wait again
while :; do
    interrupted=
    wait "$APP"
    code=$?
    [ -n "$interrupted" ] || break
done
say "app exited $code"
power_off
