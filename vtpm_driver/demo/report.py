"""The demo's output: one line per step, a live timer for slow steps, the verdict."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TextIO

OK, FAIL, SKIP = "ok", "FAIL", "skip"
_TICK = 0.2


@dataclasses.dataclass
class StepResult:
    """What one step showed."""

    title: str
    status: str
    seconds: float | None
    detail: str


def format_step(status: str, seconds: float | None, title: str, detail: str) -> str:
    """``ok     1.52 s  create server: ...``: status first so failures stand out."""
    timing = f"{seconds:6.2f} s" if seconds is not None else " " * 8
    return f"{status:<4} {timing}  {title}: {detail}"


def verdict(results: Sequence[StepResult], elapsed: float) -> tuple[str, StepResult | None]:
    """The closing ``PASS: ...`` / ``FAIL: ...`` line and the first failed step (or None)."""
    failed = [result for result in results if result.status != OK]
    checks = [result for result in results if result.title != "cleanup"]
    if not failed:
        return f"PASS: all {len(checks)} checks held in {elapsed:.1f} s", None
    bad = [result for result in failed if result.status == FAIL]
    line = (f"FAIL: {len(bad)} failed, {len(failed) - len(bad)} not run, of "
            f"{len(checks)} checks ({elapsed:.1f} s): {', '.join(r.title for r in bad)}")
    return line, bad[0] if bad else failed[0]


class Reporter:
    """One line per step on ``stream``; a live timer for slow steps when ``live``."""

    def __init__(self, stream: TextIO, live: bool) -> None:
        self._stream = stream
        self._live = live
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()

    def step(self, result: StepResult) -> None:
        self.write(format_step(result.status, result.seconds, result.title, result.detail))

    @contextlib.contextmanager
    def running(self, title: str) -> Iterator[None]:
        """Show ``..  3.4 s  title`` while the step runs (terminal only)."""
        if not self._live:
            yield
            return
        started = time.monotonic()
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(_TICK):
                with self._lock:
                    self._stream.write(
                        f"\r{'..':<4} {time.monotonic() - started:6.1f} s  {title} ...")
                    self._stream.flush()

        ticker = threading.Thread(target=tick, name="demo-progress", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()
            with self._lock:
                self._stream.write("\r\033[K")
                self._stream.flush()
