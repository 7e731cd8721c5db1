"""Soak run (issue 13): ``python -m bench.soak [--seconds S] [--workers N] [--servers M]``.

Runs tests/functional/test_soak.py on the real stack with the long bounds
(default 300 s, 3 workers, 3 servers; CI runs the test itself at 75 s) and
prints its figures as JSON: operations run, failures and refusals by kind, invariant
violations. Exit status: pytest's (0 when every invariant held).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--servers", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "soak.json"
        env = os.environ | {"VTPM_SOAK_SECONDS": str(args.seconds),
                            "VTPM_SOAK_WORKERS": str(args.workers),
                            "VTPM_SOAK_SERVERS": str(args.servers),
                            "VTPM_SOAK_REPORT": str(report)}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                              "tests/functional/test_soak.py"], cwd=ROOT, env=env)
        if report.exists():
            print(json.dumps({"soak": json.loads(report.read_text())}, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
