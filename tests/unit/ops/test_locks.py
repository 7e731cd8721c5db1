"""ops.locks: one lock per server across threads and processes (issue 13 item 1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from vtpm_driver import exception
from vtpm_driver.ops import locks

UUID = "0b7e6f0e-3a8a-4f51-8c1f-1d2a3b4c5d6e"
OTHER = "1c8f7a1f-4b9b-4a62-9d2e-2e3b4c5d6e7f"


def conf(path: Path, timeout: float = 0) -> types.SimpleNamespace:
    return types.SimpleNamespace(vtpm=types.SimpleNamespace(lock_path=str(path),
                                                            lock_timeout=timeout))


def try_in_thread(cfg, uuid: str, operation: str) -> BaseException | None:
    """Take the lock from another thread; the error it got, or None."""
    result: list[BaseException | None] = [None]

    def run() -> None:
        try:
            with locks.server_lock(cfg, uuid, operation):
                pass
        except BaseException as exc:
            result[0] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


def test_second_operation_is_refused_naming_the_holder(tmp_path: Path) -> None:
    cfg = conf(tmp_path / "locks")
    with locks.server_lock(cfg, UUID, "resize"):
        err = try_in_thread(cfg, UUID, "delete")
        assert isinstance(err, exception.ServerLocked)
        assert str(err).startswith(f"cannot delete server {UUID}: operation 'resize' "
                                   f"(pid {os.getpid()}) is in progress on it")
        assert try_in_thread(cfg, OTHER, "delete") is None  # other servers are free
    assert try_in_thread(cfg, UUID, "delete") is None
    assert not locks.holder_path(tmp_path / "locks", UUID).exists()


def test_lock_is_reentrant_in_one_thread(tmp_path: Path) -> None:
    cfg = conf(tmp_path)
    with locks.server_lock(cfg, UUID, "revert resize"):
        with locks.server_lock(cfg, UUID, "start"):
            assert locks.held_operation(UUID) == "revert resize"
    assert locks.held_operation(UUID) is None


def test_waiting_caller_gets_the_lock_when_the_holder_is_done(tmp_path: Path) -> None:
    cfg = conf(tmp_path, timeout=600)
    inside = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with locks.server_lock(cfg, UUID, "resize"):
            inside.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait()
    order: list[str] = []

    def wait_for_it() -> None:
        with locks.server_lock(cfg, UUID, "delete"):
            order.append("delete")

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    order.append("resize done")
    release.set()
    thread.join()
    waiter.join()
    assert order == ["resize done", "delete"]


def test_other_process_holds_it_until_killed(tmp_path: Path) -> None:
    # An external (fcntl) lock: a process killed with SIGKILL never leaves it held.
    script = (
        "import sys, types\n"
        "from vtpm_driver.ops import locks\n"
        "cfg = types.SimpleNamespace(vtpm=types.SimpleNamespace(lock_path=sys.argv[1], "
        "lock_timeout=0))\n"
        "with locks.server_lock(cfg, sys.argv[2], 'hard reboot'):\n"
        "    print('locked', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), UUID],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "locked\n"
        with pytest.raises(exception.ServerLocked,
                           match=rf"operation 'hard reboot' \(pid {proc.pid}\)"):
            with locks.server_lock(conf(tmp_path), UUID, "start"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with locks.server_lock(conf(tmp_path), UUID, "start"):
        pass


def test_holder_description_is_pure() -> None:
    assert locks.describe_holder(None) == "another operation"
    assert locks.describe_holder({"operation": "resize", "pid": 7}) == (
        "operation 'resize' (pid 7)")


def test_refuses_a_name_that_is_not_a_uuid(tmp_path: Path) -> None:
    with pytest.raises(exception.VTPMError, match="expected a UUID"):
        with locks.server_lock(conf(tmp_path), "../../etc/passwd", "x"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_unusable_lock_path_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(exception.InvalidConfiguration, match="lock_path"):
        with locks.server_lock(conf(tmp_path / "file" / "locks"), UUID, "x"):
            pass
