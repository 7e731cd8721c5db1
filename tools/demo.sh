#!/bin/bash
# The demo, from nothing: on a fresh Debian 12 machine, as root, run
#
#     tools/demo.sh
#
# It prepares the host (packages, libvirtd), the test guest, the project venv and a local
# Keystone + Barbican (each step is idempotent and takes about a second when already done),
# writes the demo's configuration, then runs `vtpm-driver demo` as the regular user `owner`
# of the local stack. That command creates a TPM 2.0 (CRB) guest, shows what the guest saw,
# where its key lives and that nobody but the owner can unlock it, reboots it, deletes it,
# and exits 0 only if every check held. Extra arguments go to `vtpm-driver demo`
# (e.g. `tools/demo.sh --boot-timeout 300`; see `vtpm-driver demo --help`).
#
# Environment: VTPM_STACK_DIR (stack state, default /var/lib/vtpm-driver/stack),
# VTPM_GUEST_DIR (test guest, default /var/cache/vtpm-driver/guest), VTPM_DEMO_CONF (the
# configuration written, default /var/lib/vtpm-driver/demo.conf).
set -euo pipefail
cd "$(dirname "$0")/.."

STACK_DIR=${VTPM_STACK_DIR:-/var/lib/vtpm-driver/stack}
GUEST_DIR=${VTPM_GUEST_DIR:-/var/cache/vtpm-driver/guest}
DEMO_CONF=${VTPM_DEMO_CONF:-/var/lib/vtpm-driver/demo.conf}
BARBICAN_URL=http://127.0.0.1:9311
export VTPM_STACK_DIR=$STACK_DIR VTPM_GUEST_DIR=$GUEST_DIR

die() { printf '[demo] ERROR: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root: the demo installs packages and starts libvirtd"

# step TITLE CMD...: run one preparation script, then say how long it took.
step() {
    local title=$1 t0=$SECONDS
    shift
    printf '==> %s\n' "$title"
    "$@" || die "$title failed (command: $*)"
    printf '==> %s: done in %s s\n' "$title" "$((SECONDS - t0))"
}

t_all=$SECONDS
step "host: packages, virtlogd + libvirtd" bash tools/setup-host.sh
step "test guest: kernel + busybox initramfs" bash tools/build-guest.sh
step "python venv (.venv)" bash tools/dev-venv.sh
step "Keystone + Barbican on 127.0.0.1" bash tools/keymgr-stack.sh start

# The configuration the demo runs with; rewritten every time so it always matches this
# script. It holds no secret (credentials come from the stack's openrc/clouds.yaml).
mkdir -p "$(dirname "$DEMO_CONF")"
cat >"$DEMO_CONF.new" <<EOF
# Written by tools/demo.sh: configuration for 'vtpm-driver demo' on this host.
[libvirt]
swtpm_enabled = True
# TCG: this machine's /dev/kvm cannot run guests; use kvm where it can.
virt_type = qemu

[key_manager]
barbican_endpoint = $BARBICAN_URL
EOF
mv "$DEMO_CONF.new" "$DEMO_CONF"
printf '==> preparation done in %s s; configuration: %s\n\n' "$((SECONDS - t_all))" "$DEMO_CONF"

# The demo acts as the regular user 'owner' (OS_* variables, as any OpenStack client) and
# uses the second member of the same project, 'member', from clouds.yaml.
openrc=$STACK_DIR/openrc-owner
[ -r "$openrc" ] || die "$openrc missing: run 'tools/keymgr-stack.sh provision'"
# shellcheck disable=SC1090
. "$openrc"
exec .venv/bin/vtpm-driver --config-file "$DEMO_CONF" demo \
    --clouds-file "$STACK_DIR/clouds.yaml" --member-cloud member \
    --guest-dir "$GUEST_DIR" "$@"
