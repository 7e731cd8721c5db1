"""The test-only fault points: inert unless VTPM_FAULT_AT names the step."""

from __future__ import annotations

import subprocess
import sys

from vtpm_driver import faults


def test_point_is_inert_without_the_variable(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.point("spawn.after_barbican")
    monkeypatch.setenv(faults.ENV, "other.step,spawn.after_define")
    faults.point("spawn.after_barbican")
    assert faults.armed("spawn.after_define") and not faults.armed("spawn.after")


def test_point_kills_the_process_at_the_named_step():
    code = ("from vtpm_driver import faults\n"
            "print('before', flush=True)\n"
            "faults.point('x.y')\n"
            "print('after', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], env={faults.ENV: "x.y"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == -9 and done.stdout == "before\n"
