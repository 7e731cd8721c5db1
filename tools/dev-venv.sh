#!/bin/bash
# Create or refresh the project's virtualenv (.venv) with the package and its
# test dependencies. Idempotent: skips pip when pyproject.toml is unchanged.
set -euo pipefail
TAG=dev-venv
# shellcheck source=tools/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(dirname "$0")/.."
VENV=${VTPM_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
fi
stamp="$VENV/.vtpm-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c 'import vtpm_driver' 2>/dev/null; then
    say "up to date"
    exit 0
fi
say "installing vtpm-driver and test dependencies (libvirt-python compiles, ~30 s)"
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test,bench]' 2>&1 \
    | grep -v -e '^WARNING: Location' -e 'BuildBackendWarning' || true
"$VENV/bin/python" -c 'import vtpm_driver, libvirt' || { say "install failed"; exit 1; }
echo "$want" > "$stamp"
say "done"
