#!/bin/bash
# The full test suite from nothing: host packages + libvirtd, the test guest,
# a local Keystone + Barbican, an all-in-one OpenStack whose nova-compute runs
# our shim, the project venv, then lint, the Nova shim tests, unit and
# functional tests against the real services. Safe to re-run; extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
step() { printf '\n==> [%ss] %s\n' "$((SECONDS - t0))" "$*"; }
NOVA_LOG="${VTPM_NOVA_SUITE_LOG:-/tmp/vtpm-nova-suite.log}"
step "host: packages, /dev/kvm, virtlogd + libvirtd";   bash tools/setup-host.sh
step "test guest (kernel + busybox initramfs)";        bash tools/build-guest.sh
step "two private libvirt test hosts (host-a, host-b)"; bash tools/test-hosts.sh start
step "python venv";                                     bash tools/dev-venv.sh
step "Keystone + Barbican on 127.0.0.1";                bash tools/keymgr-stack.sh start
step "all-in-one OpenStack (Nova 34 with our shim)";    bash tools/openstack-aio.sh start
step "lint (ruff)";                                     .venv/bin/ruff check .
step "Nova shim tests (in-process, real nova wheel)";   bash tools/nova-shim-tests.sh
# Nova's own vTPM tests spend most of their minutes in Nova's polling loops: they run in
# the background, next to our suite, and are reported (and gate the run) at the end.
step "Nova's own vTPM tests on the shim (in the background, log: $NOVA_LOG)"
bash tools/nova-vtpm-suite.sh >"$NOVA_LOG" 2>&1 &
nova_pid=$!
step "tests (unit + functional)"
rc=0
.venv/bin/python -m pytest -p no:cacheprovider -ra --durations=25 "$@" || rc=$?
step "Nova's own vTPM tests on the shim: result"
nova_rc=0
wait "$nova_pid" || nova_rc=$?
tail -n 40 "$NOVA_LOG"
[ "$nova_rc" = 0 ] || echo "Nova's own vTPM tests failed (exit $nova_rc); full log: $NOVA_LOG"
printf '\n==> all done in %ss\n' "$((SECONDS - t0))"
[ "$rc" = 0 ] && [ "$nova_rc" = 0 ]
