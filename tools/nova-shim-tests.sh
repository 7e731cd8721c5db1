#!/bin/bash
# Run tests/nova (the Nova shim, in-process against the real nova 34 wheel)
# with the all-in-one OpenStack's virtualenv, which holds nova and this
# checkout (editable). The main suite's venv has no nova, so these tests run
# in their own pytest invocation. What they import is declared in
# requirements/aio.txt; nothing is installed here. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VTPM_AIO_DIR:-/var/lib/vtpm-driver/aio}/venv"
[ -x "$VENV/bin/python" ] || { echo "[nova-shim-tests] no $VENV: run tools/openstack-aio.sh start" >&2; exit 1; }
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -ra tests/nova "$@"
