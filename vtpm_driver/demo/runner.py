"""Running the demo: header, steps, verdict; the demo server removed on SIGTERM too."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TextIO

from oslo_config import cfg

from vtpm_driver import exception
from vtpm_driver.demo.report import Reporter, verdict
from vtpm_driver.demo.scenario import DemoRun
from vtpm_driver.keymgr.context import RequestContext


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so the demo server is still cleaned up."""

    def on_term(signum: int, _frame: object) -> NoReturn:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(conf: cfg.ConfigOpts, backend: Any, stream: TextIO, *, live: bool,
             owner_login: Callable[[], RequestContext],
             member_login: Callable[[], RequestContext],
             probe_factory: Callable[[cfg.ConfigOpts], Any], guest_dir: Path,
             boot_timeout: float, member_label: str) -> None:
    """Run the demo, one line per step on ``stream``; closes ``backend``.

    :raises VTPMError: a check failed (naming the first); the demo server is
        deleted in any case, also on Ctrl-C or SIGTERM.
    """
    reporter = Reporter(stream, live=live)
    run = DemoRun(conf, backend, reporter, owner_login=owner_login,
                  member_login=member_login, probe_factory=probe_factory,
                  guest_dir=guest_dir, boot_timeout=boot_timeout)
    reporter.write("vtpm-driver demo: a server with a TPM 2.0 (CRB) whose key only its owner "
                   "can unlock")
    reporter.write(
        f"  server {run.name} on {backend.uri} (virt_type {conf.libvirt.virt_type}); "
        f"Barbican {conf.key_manager.barbican_endpoint or 'from the service catalog'}; "
        f"other user: {member_label}")
    started = time.monotonic()
    try:
        with _terminate_as_exit():
            results = run.run()
    finally:
        backend.close()
    line, first = verdict(results, time.monotonic() - started)
    reporter.write(line)
    if first is not None:
        raise exception.VTPMError(f"demo failed at '{first.title}': {first.detail}")
