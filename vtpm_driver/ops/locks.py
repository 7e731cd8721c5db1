"""One lock per server, across threads and processes (issue 13: never two operations at once).

Every operation that changes a server, its state, its secrets or its record
runs under :func:`server_lock`::

    with locks.server_lock(conf, instance.uuid, "resize"):
        ...

It is an oslo.concurrency external lock (``lockutils.external_lock``: an
``fcntl`` lock on ``<[vtpm] lock_path>/vtpm-<uuid>``) plus lockutils' internal
semaphore of the same name, so two threads of one process exclude each other
as two processes do. The lock is released by the kernel when its holder dies
(``kill -9`` included): a crash never leaves a server locked.

Next to the lock file, ``vtpm-<uuid>.holder`` names the operation and process
that hold it, for the message of :class:`~vtpm_driver.exception.ServerLocked`.
It is informative only: the ``fcntl`` lock decides.

The lock is re-entrant within one thread (an operation that calls another on
the same server, e.g. a resize that wraps both of Nova's steps, takes it once).
Inside nova-compute, Nova's own instance lock serialises API operations; the
shim takes this one only where Nova does not (periodic tasks, ``init_host``).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oslo_concurrency import lockutils
from oslo_log import log as logging

from vtpm_driver import exception
from vtpm_driver.model.server import require_uuid

LOG = logging.getLogger(__name__)

LOCK_PREFIX = "vtpm-"
HOLDER_SUFFIX = ".holder"

_held = threading.local()


def lock_name(instance_uuid: str) -> str:
    """The lock's name (and file name without the prefix): the canonical UUID.

    :raises VTPMError: not a UUID (a hostile value never reaches a path).
    """
    return require_uuid(instance_uuid, "instance uuid", exception.VTPMError)


def holder_path(lock_path: str | os.PathLike[str], instance_uuid: str) -> Path:
    """``<lock_path>/vtpm-<uuid>.holder``."""
    return Path(lock_path) / f"{LOCK_PREFIX}{lock_name(instance_uuid)}{HOLDER_SUFFIX}"


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``operation 'resize' (pid 123)``, or a plain phrase when nothing is known. Pure."""
    if not holder or not holder.get("operation"):
        return "another operation"
    pid = holder.get("pid")
    return f"operation {holder['operation']!r}" + (f" (pid {pid})" if pid else "")


def read_holder(lock_path: str | os.PathLike[str], instance_uuid: str) -> dict[str, Any] | None:
    """What the holder file says (operation, pid, since), or None when unreadable."""
    try:
        data = json.loads(holder_path(lock_path, instance_uuid).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_holder(path: Path, operation: str) -> None:
    data = {"operation": operation, "pid": os.getpid(), "since": time.time()}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as exc:  # informative only: the lock itself is held
        LOG.warning("Could not write lock holder file %s: %s", path, exc.strerror)


def _remove_holder(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def held_operation(instance_uuid: str) -> str | None:
    """The operation this thread holds the server's lock for, or None."""
    return getattr(_held, "locks", {}).get(lock_name(instance_uuid))


@contextlib.contextmanager
def server_lock(conf: Any, instance_uuid: str, operation: str,
                timeout: float | None = None) -> Iterator[None]:
    """Hold the server's lock for ``operation``; wait up to ``[vtpm] lock_timeout`` s.

    Re-entrant in one thread. ``timeout`` overrides the option (0: do not wait).

    :raises ServerLocked: another operation holds it after the timeout (the
        message names that operation and its pid).
    :raises InvalidConfiguration: ``[vtpm] lock_path`` cannot be created.
    :raises VTPMError: ``instance_uuid`` is not a UUID.
    """
    name = lock_name(instance_uuid)
    held: dict[str, str] = _held.__dict__.setdefault("locks", {})
    if name in held:
        yield
        return
    lock_path = str(conf.vtpm.lock_path)
    wait = float(conf.vtpm.lock_timeout if timeout is None else timeout)
    try:
        os.makedirs(lock_path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise exception.InvalidConfiguration(
            f"cannot create [vtpm] lock_path {lock_path!r}: {exc.strerror}"
        ) from None
    deadline = time.monotonic() + wait
    semaphore = lockutils.internal_lock(name)
    got = semaphore.acquire(timeout=wait) if wait > 0 else semaphore.acquire(blocking=False)
    if not got:
        raise _locked(lock_path, instance_uuid, operation, wait)
    try:
        external = lockutils.external_lock(name, lock_file_prefix=LOCK_PREFIX,
                                           lock_path=lock_path)
        remaining = max(deadline - time.monotonic(), 0)
        try:
            got = external.acquire(blocking=remaining > 0, timeout=remaining or None)
        except OSError as exc:
            raise exception.InvalidConfiguration(
                f"cannot lock server {name} in [vtpm] lock_path {lock_path!r}: "
                f"{exc.strerror or exc}"
            ) from None
        if not got:
            raise _locked(lock_path, instance_uuid, operation, wait)
        holder = holder_path(lock_path, name)
        try:
            _write_holder(holder, operation)
            held[name] = operation
            LOG.debug("Locked server for %s", operation, instance_uuid=name)
            try:
                yield
            finally:
                del held[name]
                _remove_holder(holder)
        finally:
            external.release()
    finally:
        semaphore.release()


def _locked(lock_path: str, instance_uuid: str, operation: str,
            wait: float) -> exception.ServerLocked:
    holder = describe_holder(read_holder(lock_path, instance_uuid))
    return exception.ServerLocked(
        f"cannot {operation} server {instance_uuid}: {holder} is in progress on it "
        f"(waited {wait:g} s, [vtpm] lock_timeout); try again when it has finished"
    )
