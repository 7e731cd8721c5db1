#!/bin/bash
# Start over: stop every service the project's scripts started and remove everything they
# created, leaving the Debian packages, so the next tools/demo.sh or tools/run-tests.sh
# builds it all again as on a fresh machine. Under CI=true tools/run-tests.sh runs this
# first, so a green CI run means a fresh machine passes.
#
# Stops: the all-in-one OpenStack (nova-*, placement, glance, MariaDB, RabbitMQ), Keystone
#   and Barbican, the two libvirt test hosts, and the system virtlogd + libvirtd when they
#   run without systemd (tools/setup-host.sh started them).
# Removes: guests the project created on the system libvirtd (domains carrying vtpm-driver's
#   metadata, Nova domains whose disks lie under the all-in-one's directory), with their TPM
#   state and their vTPM libvirt secrets; /var/lib/vtpm-driver (the stack's, the AIO's and the
#   test hosts' virtualenvs, configuration, databases, keys and logs; lock, console, resize
#   and state-store directories); /var/cache/vtpm-driver (the test guest, pip's downloads);
#   this checkout's .venv; /tmp/vtpm-* (test logs, pytest and bench directories).
# Leaves, and lists: swtpm state directories under /var/lib/libvirt/swtpm that belong to no
#   domain (nothing proves the project made them).
# Environment: VTPM_STACK_DIR, VTPM_AIO_DIR, VTPM_HOSTS_DIR, VTPM_GUEST_DIR, VTPM_VENV.
set -euo pipefail
TAG=reset
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tools/lib.sh
. "$HERE/lib.sh"
cd "$HERE/.."
[ "$(id -u)" = 0 ] || die "must run as root (stops libvirtd, removes /var/lib/vtpm-driver)"

STATE_ROOT=/var/lib/vtpm-driver
CACHE_ROOT=/var/cache/vtpm-driver
AIO_DIR="${VTPM_AIO_DIR:-$STATE_ROOT/aio}"
OWN_NS="https://github.com/vtpm-driver/xmlns/server/1.0"
NOVA_NS="http://openstack.org/xmlns/libvirt/nova/"
t0=$SECONDS

# Services first, all at once (each script stops only what it started; nothing running is
# fine).
bash tools/openstack-aio.sh stop 2>&1 | sed 's/^/  /' &
bash tools/keymgr-stack.sh stop 2>&1 | sed 's/^/  /' &
bash tools/test-hosts.sh stop 2>&1 | sed 's/^/  /' &
wait

# Guests the project created on the system libvirtd, with their TPM state and secrets.
if command -v virsh >/dev/null && virsh -q -c qemu:///system uri >/dev/null 2>&1; then
    removed=()
    while read -r dom; do
        [ -n "$dom" ] || continue
        xml="$(virsh -q -c qemu:///system dumpxml --inactive "$dom" 2>/dev/null)" || continue
        if grep -q "$OWN_NS" <<<"$xml" \
            || { grep -q "$NOVA_NS" <<<"$xml" && grep -q "file='$AIO_DIR/" <<<"$xml"; }; then
            uuid="$(virsh -q -c qemu:///system domuuid "$dom")"
            virsh -q -c qemu:///system destroy "$dom" >/dev/null 2>&1 || true
            if virsh -q -c qemu:///system undefine --tpm --nvram --managed-save "$dom" \
                    >/dev/null 2>&1 \
                || virsh -q -c qemu:///system undefine --tpm --managed-save "$dom" >/dev/null; then
                removed+=("$uuid")
                say "removed domain $dom ($uuid) and its TPM state"
            else
                say "WARNING: could not remove domain $dom ($uuid); left as it is"
            fi
        fi
    done < <(virsh -q -c qemu:///system list --all --name)
    for uuid in "${removed[@]}"; do
        while read -r sec usage; do
            [ "$usage" = "vtpm $uuid" ] || continue
            virsh -q -c qemu:///system secret-undefine "$sec" >/dev/null && say "removed libvirt secret $sec"
        done < <(virsh -q -c qemu:///system secret-list 2>/dev/null | awk '{u=$1; $1=""; sub(/^ /,""); print u, $0}')
    done
    if [ ! -d /run/systemd/system ]; then
        for daemon in libvirtd virtlogd; do
            if pid="$(pgrep -x "$daemon")"; then
                say "stopping $daemon (pid $pid)"
                kill -TERM "$pid" 2>/dev/null || true
                wait_gone "$pid" "$daemon"
            fi
        done
    fi
fi
if [ -d /var/lib/libvirt/swtpm ]; then
    left="$(find /var/lib/libvirt/swtpm -mindepth 1 -maxdepth 1 -type d | wc -l)"
    [ "$left" = 0 ] || say "left alone: $left swtpm state directories in /var/lib/libvirt/swtpm (of no domain the project can prove it made)"
fi

for path in "$STATE_ROOT" "$CACHE_ROOT" "${VTPM_VENV:-.venv}" .venv.pip.log /tmp/vtpm-*; do
    [ -e "$path" ] || continue
    # A test host's mounts are gone once it stopped; never follow anything out of the tree.
    if grep -q " $path/" /proc/mounts; then
        die "$path still has mounts (a test host did not stop?): $(grep " $path/" /proc/mounts | cut -d' ' -f2 | head -3 | tr '\n' ' ')"
    fi
    rm -rf --one-file-system "$path"
    say "removed $path"
done
say "done in $((SECONDS - t0)) s; Debian packages are left installed"
