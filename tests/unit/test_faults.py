"""The test-only fault points: inert unless VTPM_FAULT_AT names the step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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


def test_stop_mode_pauses_the_process_until_it_is_continued():
    code = ("from vtpm_driver import faults\n"
            "print('before', flush=True)\n"
            "faults.point('x.y')\n"
            "print('after', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env={faults.ENV: "a.b, x.y:stop"},
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "before\n"
        deadline = time.monotonic() + 60
        while _state(proc.pid) != "T":  # stopped at the step, not gone
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.stdout.read() == "after\n" and proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_armed_reads_kill_and_stop_entries(monkeypatch):
    monkeypatch.setenv(faults.ENV, "a.b:stop,c.d,,e.f:other")
    assert faults.armed("a.b") and faults.armed("c.d") and faults.armed("e.f")
    assert not faults.armed("a") and not faults.armed("a.b:stop")


def _state(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
