#!/bin/bash
# The full test suite from nothing: host packages + libvirtd, the test guest,
# a local Keystone + Barbican, an all-in-one OpenStack whose nova-compute runs
# our shim, the project venv, then lint, the Nova shim tests, unit and
# functional tests against the real services. Safe to re-run; extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }
t0=$SECONDS
step "host: packages, /dev/kvm, virtlogd + libvirtd";   bash tools/setup-host.sh
step "test guest (kernel + busybox initramfs)";        bash tools/build-guest.sh
step "two private libvirt test hosts (host-a, host-b)"; bash tools/test-hosts.sh start
step "python venv";                                     bash tools/dev-venv.sh
step "Keystone + Barbican on 127.0.0.1";                bash tools/keymgr-stack.sh start
step "all-in-one OpenStack (Nova 34 with our shim)";    bash tools/openstack-aio.sh start
step "lint (ruff)";                                     .venv/bin/ruff check .
step "Nova shim tests (in-process, real nova wheel)";   bash tools/nova-shim-tests.sh
step "Nova's own vTPM tests on the shim";               bash tools/nova-vtpm-suite.sh
step "tests (unit + functional)"
.venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
printf '\n==> all done in %ss\n' "$((SECONDS - t0))"
