#!/bin/bash
# Four private libvirt compute hosts on this machine, next to the system libvirtd, for
# everything that moves between hosts (cold and live migration, evacuate, unshelve): two
# pairs (host-a + host-b, host-c + host-d), so that two streams of tests that move
# servers run side by side, each between the hosts of its pair.
#
#   tools/test-hosts.sh start     start every host (idempotent)
#   tools/test-hosts.sh stop [HOST]  stop all, or only HOST (their guests go with them)
#   tools/test-hosts.sh status    exit 0 when all answer, 3 when not
#
# Each host runs its own virtlogd + libvirtd in its own mount and PID namespace, with
# its own /etc/libvirt, /run/libvirt, /var/lib/libvirt (incl. swtpm/), /var/cache/libvirt,
# /var/log/libvirt, /var/log/swtpm and /var/lib/swtpm-localca bind-mounted from
# $VTPM_HOSTS_DIR/<host>/, and its own host UUID and migration port range, and its own UTS
# namespace whose host name is the host's name (libvirt's getHostname, so a nova-compute on
# it reports node "host-a" / "host-b", not the machine's name). It answers on
# loopback only:
#   host-a  qemu+tcp://127.0.0.1:16611/system   migration ports 49152-49215
#   host-b  qemu+tcp://127.0.0.1:16612/system   migration ports 49216-49279
#   host-c  qemu+tcp://127.0.0.1:16613/system   migration ports 49280-49343
#   host-d  qemu+tcp://127.0.0.1:16614/system   migration ports 49344-49407
# The system daemon and its domains are untouched. Migrations must pass the loopback
# address explicitly (VIR_MIGRATE_PARAM_URI tcp://127.0.0.1, LISTEN_ADDRESS 127.0.0.1):
# see ../shared/notes/two-hosts-on-one-machine.md. Writes $VTPM_HOSTS_DIR/<host>/vtpm-driver.conf
# for each host: the vtpm-driver command line's one host ([libvirt] connection_uri, [vtpm]
# swtpm_state_dir). Servers move between the hosts only through Nova (the all-in-one cloud).
set -euo pipefail
TAG=test-hosts
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tools/lib.sh
. "$HERE/lib.sh"

HOSTS_DIR="${VTPM_HOSTS_DIR:-/var/lib/vtpm-driver/hosts}"
HOSTS=(host-a host-b host-c host-d)
declare -A PORT=([host-a]=16611 [host-b]=16612 [host-c]=16613 [host-d]=16614)
declare -A MIGRATION_PORTS=([host-a]="49152 49215" [host-b]="49216 49279"
                            [host-c]="49280 49343" [host-d]="49344 49407")
# system path -> name of the host's own copy under $HOSTS_DIR/<host>/
declare -A MOUNTS=([/etc/libvirt]=etc [/run/libvirt]=run [/var/lib/libvirt]=lib
                   [/var/cache/libvirt]=cache [/var/log/libvirt]=log
                   [/var/log/swtpm]=log-swtpm [/var/lib/swtpm-localca]=swtpm-localca)
START_TIMEOUT="${VTPM_HOSTS_START_TIMEOUT:-60}"

usage() {
    echo "usage: $0 {start|stop [HOST]|status}" >&2
    exit 2
}

uri() { echo "qemu+tcp://127.0.0.1:${PORT[$1]}/system"; }

# pid of the host's namespace init (the unshare child holding its daemons), or nothing.
host_pid() { pid_if_matches "$HOSTS_DIR/$1/init.pid" "vtpm-test-host $1"; }

# true when the running host has its own UTS namespace named after it (older starts did not).
own_hostname() { [ "$(nsenter -t "$1" -u hostname 2>/dev/null)" = "$2" ]; }

answers() { virsh -q -c "$(uri "$1")" uri >/dev/null 2>&1; }

# Make the host's private copies of libvirt's directories and its configuration.
prepare() {
    local name="$1" dir="$HOSTS_DIR/$1" target sub lo hi
    mkdir -p "$dir"
    chmod 0700 "$dir"
    for target in "${!MOUNTS[@]}"; do
        sub="$dir/${MOUNTS[$target]}"
        [ -d "$target" ] || mkdir -p "$target"  # bind-mount point (e.g. /var/log/swtpm)
        [ -d "$sub" ] || mkdir -p "$sub"
    done
    if [ ! -f "$dir/etc/.copied" ]; then
        cp -a /etc/libvirt/. "$dir/etc/"
        rm -rf "$dir/etc/secrets" "$dir/etc/qemu/"*.xml 2>/dev/null || true  # none of the system's
        mkdir -p "$dir/etc/secrets"
        chmod 0700 "$dir/etc/secrets"
        touch "$dir/etc/.copied"
    fi
    # Same owners and modes as the system's directories (QEMU runs as libvirt-qemu,
    # swtpm as tss).
    chown --reference=/var/lib/libvirt "$dir/lib"
    chmod --reference=/var/lib/libvirt "$dir/lib"
    chown tss:root "$dir/swtpm-localca"
    chmod 0750 "$dir/swtpm-localca"
    [ -s "$dir/host-uuid" ] || cat /proc/sys/kernel/random/uuid >"$dir/host-uuid"
    read -r lo hi <<<"${MIGRATION_PORTS[$name]}"
    cat >"$dir/etc/libvirtd.conf" <<EOF
# Written by tools/test-hosts.sh for $name: do not edit.
listen_tls = 0
listen_tcp = 1
auth_tcp = "none"
tcp_port = "${PORT[$name]}"
listen_addr = "127.0.0.1"
host_uuid = "$(cat "$dir/host-uuid")"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
    cat >"$dir/etc/qemu.conf" <<EOF
# Written by tools/test-hosts.sh for $name: do not edit.
migration_port_min = $lo
migration_port_max = $hi
cgroup_controllers = [ ]
EOF
}

start_host() {
    local name="$1" dir="$HOSTS_DIR/$1" binds="" target deadline
    local pid
    if pid="$(host_pid "$name")" && answers "$name"; then
        if own_hostname "$pid" "$name"; then
            say "$name: already running at $(uri "$name")"
            return 0
        fi
        say "$name: started by an older version of this script (no own host name); restarting it"
    fi
    host_pid "$name" >/dev/null && stop_host "$name"
    port_in_use "127.0.0.1:${PORT[$name]}" \
        && die "127.0.0.1:${PORT[$name]} is in use by something that is not $name (see: ss -ltnp)"
    prepare "$name"
    for target in "${!MOUNTS[@]}"; do
        binds+="mount --bind '$dir/${MOUNTS[$target]}' '$target' && "
    done
    say "starting $name at $(uri "$name")"
    # The namespace's init (pid 1 there) mounts the host's directories, starts the two
    # daemons and then only reaps children; killing it ends the host and its guests.
    # shellcheck disable=SC2016
    setsid unshare --mount --propagation private --pid --uts --fork --mount-proc \
        bash -c "exec -a 'vtpm-test-host $name' bash -c '
            hostname $name && ${binds}
            rm -f /run/libvirt/*.pid /run/libvirt/*-sock*
            virtlogd -d -p /run/libvirt/virtlogd.pid &&
            libvirtd -d --listen -p /run/libvirt/libvirtd.pid || exit 1
            trap \"exit 0\" TERM
            while :; do sleep 3600 & wait \$!; done'" \
        >"$dir/init.log" 2>&1 </dev/null 9>&- &
    echo $! >"$dir/unshare.pid"
    # The unshare child (the namespace's init) is what host_pid tracks.
    deadline=$((SECONDS + 10))
    until pgrep -f -P "$(cat "$dir/unshare.pid")" "vtpm-test-host $name" >"$dir/init.pid" 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || die_with_log "$name: its namespace did not start" "$dir/init.log"
        sleep 0.1
    done
    deadline=$((SECONDS + START_TIMEOUT))
    until answers "$name"; do
        host_pid "$name" >/dev/null || die_with_log "$name exited during start-up" "$dir/init.log" "$dir/log/libvirtd.log"
        [ "$SECONDS" -lt "$deadline" ] || die_with_log "$name did not answer within ${START_TIMEOUT}s" "$dir/init.log" "$dir/log/libvirtd.log"
        sleep 0.2
    done
}

stop_host() {
    local name="$1" pid
    if ! pid="$(host_pid "$name")"; then
        say "$name: not running"
        rm -f "$HOSTS_DIR/$name/init.pid" "$HOSTS_DIR/$name/unshare.pid"
        return 0
    fi
    say "stopping $name (namespace init $pid; its guests stop with it)"
    # Stop libvirtd first so it can let go of its guests; then end the namespace.
    nsenter -t "$pid" -m -p sh -c 'kill -TERM $(cat /run/libvirt/libvirtd.pid) 2>/dev/null' || true
    sleep 0.5
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" "$name" 20
    rm -f "$HOSTS_DIR/$name/init.pid" "$HOSTS_DIR/$name/unshare.pid"
}

write_conf() {
    local name="$1" conf="$HOSTS_DIR/$1/vtpm-driver.conf"
    cat >"$conf" <<EOF
# Written by tools/test-hosts.sh: test host $name as the vtpm-driver command line's one host.
[libvirt]
connection_uri = $(uri "$name")
[vtpm]
# The host's swtpm directory as seen from here.
swtpm_state_dir = $HOSTS_DIR/$name/lib/swtpm
EOF
    chmod 0644 "$conf"
}

cmd_start() {
    [ "$(id -u)" = 0 ] || die "must run as root (namespaces, bind mounts, libvirtd)"
    command -v unshare >/dev/null && command -v libvirtd >/dev/null \
        || die "needs unshare and libvirtd: run tools/setup-host.sh first"
    local name
    for name in "${HOSTS[@]}"; do
        start_host "$name"
        write_conf "$name"
    done
    # The configuration of both hosts that earlier versions wrote ([vtpm] hosts): gone.
    rm -f "$HOSTS_DIR/vtpm-driver.conf"
    say "all hosts up; configuration: $HOSTS_DIR/<host>/vtpm-driver.conf"
}

cmd_stop() {
    local name
    for name in "${@:-${HOSTS[@]}}"; do
        [ -n "${PORT[$name]:-}" ] || die "unknown host $name (hosts: ${HOSTS[*]})"
        stop_host "$name"
    done
}

cmd_status() {
    local rc=0 name pid
    for name in "${HOSTS[@]}"; do
        if pid="$(host_pid "$name")" && answers "$name"; then
            say "$name: running (namespace init $pid), answers at $(uri "$name")"
        else
            say "$name: not running"
            rc=3
        fi
    done
    return "$rc"
}

lock() { lock_dir "$HOSTS_DIR" 120; }

[ $# -ge 1 ] || usage
case "$1" in
    start) [ $# -eq 1 ] || usage; lock; cmd_start ;;
    stop) [ $# -le 2 ] || usage; lock; shift; cmd_stop "$@" ;;
    status) cmd_status ;;
    *) usage ;;
esac
