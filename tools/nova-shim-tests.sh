#!/bin/bash
# Run tests/nova (the Nova shim, in-process against the real nova 34 wheel)
# with the all-in-one OpenStack's virtualenv, which holds nova and this
# checkout (editable). The main suite's venv has no nova, so these tests run
# in their own pytest invocation. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VTPM_AIO_DIR:-/var/lib/vtpm-driver/aio}/venv"
[ -x "$VENV/bin/python" ] || { echo "[nova-shim-tests] no $VENV: run tools/openstack-aio.sh start" >&2; exit 1; }
if ! "$VENV/bin/python" -c 'import pytest' 2>/dev/null; then
    echo "[nova-shim-tests] installing pytest into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check pytest
fi
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -ra tests/nova "$@"
