#!/bin/bash
# The full test suite from nothing: host packages + libvirtd, the test guest,
# a local Keystone + Barbican, an all-in-one OpenStack whose nova-compute runs
# our shim, the project venv, then lint, the Nova shim tests, unit and
# functional tests against the real services. Safe to re-run; extra args go to pytest.
# Under CI=true it first removes everything the scripts built (tools/reset.sh), so every
# virtualenv and every service's state is made from nothing, as on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
step() { printf '\n==> [%ss] %s\n' "$((SECONDS - t0))" "$*"; }
NOVA_LOG="${VTPM_NOVA_SUITE_LOG:-/tmp/vtpm-nova-suite.log}"
case "${CI:-}" in
    1 | true | yes) step "CI: start from nothing (tools/reset.sh)"; bash tools/reset.sh ;;
esac
step "host: packages, /dev/kvm, virtlogd + libvirtd";   bash tools/setup-host.sh
step "test guest (kernel + busybox initramfs)";        bash tools/build-guest.sh
step "four private libvirt test hosts (host-a ... host-d)"; bash tools/test-hosts.sh start
# The project's and the AIO's venvs build while Keystone and Barbican start (all three
# mostly wait on pip).
step "python venvs: the project's, the AIO's (next to the next step)"
bash tools/dev-venv.sh &
venv_pid=$!
bash tools/openstack-aio.sh venv &
aio_venv_pid=$!
step "Keystone + Barbican on 127.0.0.1";                bash tools/keymgr-stack.sh start
wait "$venv_pid" || { echo "tools/dev-venv.sh failed" >&2; exit 1; }
wait "$aio_venv_pid" || { echo "tools/openstack-aio.sh venv failed" >&2; exit 1; }
# The all-in-one starts (mostly waiting on its services) while the environments are checked,
# the code linted and the shim's in-process tests run; its output is shown once it is up.
AIO_START_LOG="${VTPM_AIO_START_LOG:-/tmp/vtpm-aio-start.log}"
step "in the background: all-in-one OpenStack (Nova 34 with our shim; log: $AIO_START_LOG)"
bash tools/openstack-aio.sh start >"$AIO_START_LOG" 2>&1 &
aio_start_pid=$!
step "environments: pip check, every test module imports"; bash tools/check-envs.sh
step "lint (ruff)";                                     .venv/bin/ruff check .
NOVA_UNIT_LOG="${NOVA_LOG%.log}-unit.log"
if [ $# -eq 0 ]; then
    # Nova's own functional vTPM tests give a server about 5 s (10 polls, 0.5 s apart) to
    # leave BUILD or send a notification; next to real TCG guests on 2 cores they were
    # starved past that. So they run first, at a higher CPU priority (the run is root's),
    # next to the AIO's start and the "alone" tests, and the busiest phase (AIO streams,
    # standalone tests, Nova's unit tests) waits for them; nothing else waits on a clock
    # that short.
    step "in the background: Nova's own functional vTPM tests on the shim (log: $NOVA_LOG)"
    VTPM_NOVA_SUITE_UNIT=0 nice -n -10 bash tools/nova-vtpm-suite.sh >"$NOVA_LOG" 2>&1 &
    nova_pid=$!
fi
step "Nova shim tests (in-process, real nova wheel)";   bash tools/nova-shim-tests.sh
step "all-in-one OpenStack: waiting until it is up"
aio_start_rc=0
wait "$aio_start_pid" || aio_start_rc=$?
cat "$AIO_START_LOG"
[ "$aio_start_rc" = 0 ] || { echo "tools/openstack-aio.sh start failed (exit $aio_start_rc)" >&2; exit 1; }
# The tests run in two phases on 2 cores, each run gating the result:
#  1. the tests marked "alone" (they count the shared Keystone's and Barbican's requests,
#     list every secret of the owner, or restart a test host's libvirtd under the AIO's
#     computes) while the AIO is idle, next to Nova's own functional vTPM tests, which are
#     in-process (no shared service) and mostly need one core;
#  2. our tests through the all-in-one OpenStack (marker "aio"; they mostly wait for Nova)
#     in three streams, Nova's unit tests (test_driver.py on the shim) in the background,
#     next to the unit and standalone functional tests; all but the two test-host streams
#     wait for Nova's functional tests.
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider -ra --durations=15)
if [ $# -gt 0 ]; then
    step "tests: pytest $*"
    rc=0
    "${PYTEST[@]}" "$@" || rc=$?
    printf '\n==> all done in %ss\n' "$((SECONDS - t0))"
    exit "$rc"
fi
AIO_LOG="${VTPM_AIO_TESTS_LOG:-/tmp/vtpm-aio-tests.log}"
step "tests that need the shared services to themselves (the AIO idle)"
alone_rc=0
"${PYTEST[@]}" -m alone || alone_rc=$?
step "the AIO's computes ready again (enabled, up: a test restarted host-a's libvirtd)"
bash tools/openstack-aio.sh start
# Three streams through the AIO, on disjoint computes: the tests of one server on one host
# on the system libvirtd's compute (zone vtpm-aio), those marked "multihost" on the first
# pair of test hosts (zone vtpm-multihost, where servers move and computes are stopped),
# the Nova fault rows ("second_pair") on the second pair (zone vtpm-multihost-2); each
# mostly waits for Nova. The two longer ones (the test hosts') start at once; the rest
# waits for Nova's functional tests.
AIO1_LOG="${AIO_LOG%.log}-vtpm-aio.log"
AIO2_LOG="${AIO_LOG%.log}-second-pair.log"
step "in the background: our tests through the AIO on its first pair of test hosts (log: $AIO_LOG)"
"${PYTEST[@]}" -m "aio and multihost" --basetemp=/tmp/vtpm-aio-pytest >"$AIO_LOG" 2>&1 &
aio_pid=$!
step "in the background: the Nova fault rows on the second pair of test hosts (log: $AIO2_LOG)"
"${PYTEST[@]}" -m "aio and second_pair" --basetemp=/tmp/vtpm-aio2-pytest >"$AIO2_LOG" 2>&1 &
aio2_pid=$!
# Until Nova's functional tests are done, one guest at a time here too: the fault rows.
FAULTS=tests/functional/test_faults.py
step "tests: the fault-injection rows that need no service to themselves"
rc=0
"${PYTEST[@]}" -m "not aio and not alone" "$FAULTS" || rc=$?
step "waiting for Nova's own functional vTPM tests"
nova_rc=0
wait "$nova_pid" || nova_rc=$?
tail -n 20 "$NOVA_LOG"
[ "$nova_rc" = 0 ] || echo "Nova's own functional vTPM tests failed (exit $nova_rc); full log: $NOVA_LOG"
step "in the background: Nova's unit tests of its libvirt driver, on the shim (log: $NOVA_UNIT_LOG)"
VTPM_NOVA_SUITE_FUNCTIONAL=0 nice -n 5 bash tools/nova-vtpm-suite.sh >"$NOVA_UNIT_LOG" 2>&1 &
nova_unit_pid=$!
step "in the background: our tests through the AIO on its first compute (log: $AIO1_LOG)"
"${PYTEST[@]}" -m "aio and not multihost and not second_pair" --basetemp=/tmp/vtpm-aio1-pytest \
    >"$AIO1_LOG" 2>&1 &
aio1_pid=$!
step "tests: unit + the other standalone functional tests (next to the AIO tests)"
"${PYTEST[@]}" -m "not aio and not alone" --ignore="$FAULTS" || rc=$?
step "background runs: results"
wait "$nova_unit_pid" || nova_rc=$?
aio_rc=0
wait "$aio_pid" || aio_rc=$?
wait "$aio1_pid" || aio_rc=$?
wait "$aio2_pid" || aio_rc=$?
tail -n 30 "$NOVA_UNIT_LOG"
[ "$nova_rc" = 0 ] || echo "Nova's own vTPM tests failed (exit $nova_rc); logs: $NOVA_LOG, $NOVA_UNIT_LOG"
tail -n 30 "$AIO1_LOG" "$AIO2_LOG" "$AIO_LOG"
[ "$aio_rc" = 0 ] || echo "tests through the all-in-one OpenStack failed (exit $aio_rc); full logs: $AIO1_LOG, $AIO2_LOG, $AIO_LOG"
printf '\n==> all done in %ss\n' "$((SECONDS - t0))"
[ "$rc" = 0 ] && [ "$nova_rc" = 0 ] && [ "$aio_rc" = 0 ] && [ "$alone_rc" = 0 ]
