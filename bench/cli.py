"""``python -m bench``: run the benchmarks, print a JSON report and a short summary.

The JSON report goes to stdout (or ``--output FILE``); the human summary goes
to stderr. Sections: ``keymgr`` (Barbican create/unlock/delete, ours vs
castellan vs the raw floor), ``scale`` (concurrent vTPM preparations and
``init_host`` with many defined domains), ``boot`` (spawn to guest result,
through the driver) and ``memory``. (Moving a server between hosts is
Nova's job, measured with Nova, not here.) A section whose prerequisites are missing
is reported as skipped with the reason; one that fails is reported with its
error and makes the exit status 1. ``--check-targets`` exits 3 when a
measured target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from bench import services, summary, targets
from vtpm_driver.cli.common import int_at_least

SECTIONS = ("keymgr", "scale", "boot", "manufacture")
#: What runs without --sections.
DEFAULT_SECTIONS = SECTIONS
EXIT_SECTION_FAILED = 1
EXIT_TARGET_MISSED = 3


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much to run; ``quick()`` is the smoke run the test suite uses."""

    keymgr_runs: int = 30
    prep_levels: tuple[int, ...] = (1, 4, 16)
    prep_tasks: int = 32
    init_host_levels: tuple[int, ...] = (10, 100, 1000)
    init_host_repeats: int = 5
    boot_runs: int = 3
    spawn_concurrency: tuple[int, ...] = (1, 4)
    manufacture_runs: int = 5

    @classmethod
    def quick(cls) -> Settings:
        return cls(keymgr_runs=3, prep_levels=(1, 4), prep_tasks=4,
                   init_host_levels=(5, 20), init_host_repeats=3, boot_runs=1,
                   spawn_concurrency=(), manufacture_runs=1)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if values and min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="vtpm-driver benchmarks: key manager, boot and scale. JSON report on "
                    "stdout (or --output), human summary on stderr.")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: few repetitions, small N (about a minute)")
    p.add_argument("--output", "-o", metavar="FILE", help="write the JSON report here")
    p.add_argument("--sections", type=lambda s: tuple(x.strip() for x in s.split(",")),
                   default=DEFAULT_SECTIONS,
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default "
                        f"{','.join(DEFAULT_SECTIONS)})")
    p.add_argument("--keymgr-runs", type=int_at_least(1),
                   help="repetitions per key manager operation")
    p.add_argument("--boot-runs", type=int_at_least(1), help="boots of each kind (default 3)")
    p.add_argument("--prep-concurrency", type=_int_list, metavar="N,N,...",
                   help="concurrency levels of vTPM preparations (default 1,4,16)")
    p.add_argument("--init-host-domains", type=_int_list, metavar="N,N,...",
                   help="defined vTPM domains for init_host (default 10,100,1000)")
    p.add_argument("--spawn-concurrency", type=_int_list, metavar="N,N,...",
                   help="concurrent vTPM spawns (default 1,4; empty in --quick)")
    p.add_argument("--tracemalloc", action="store_true",
                   help="also record Python heap peaks per section (slows every timing)")
    p.add_argument("--check-targets", action="store_true",
                   help=f"exit {EXIT_TARGET_MISSED} when a measured target is missed")
    p.add_argument("--source-addr", default=os.environ.get("VTPM_BENCH_SOURCE_ADDR",
                                                           services.DEFAULT_SOURCE_ADDR),
                   help="loopback address our HTTP requests come from, so the access logs "
                        "tell them from other clients' (default %(default)s)")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    base = Settings.quick() if args.quick else Settings()
    overrides = {
        "keymgr_runs": args.keymgr_runs,
        "boot_runs": args.boot_runs,
        "prep_levels": args.prep_concurrency,
        "init_host_levels": args.init_host_domains,
        "spawn_concurrency": args.spawn_concurrency,
    }
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


class MemoryTracker:
    """Peak RSS of this process after each section, and Python heap peaks if asked."""

    def __init__(self, use_tracemalloc: bool) -> None:
        self.use_tracemalloc = use_tracemalloc
        self.sections: dict[str, dict] = {}
        if use_tracemalloc:
            tracemalloc.start()

    @staticmethod
    def peak_rss_mib() -> float:
        # Linux reports ru_maxrss in KiB.
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)

    def section_done(self, name: str) -> None:
        entry: dict[str, Any] = {"peak_rss_mib_so_far": self.peak_rss_mib()}
        if self.use_tracemalloc:
            _current, peak = tracemalloc.get_traced_memory()
            entry["tracemalloc_peak_mib"] = round(peak / 2**20, 2)
            tracemalloc.reset_peak()
        self.sections[name] = entry

    def report(self) -> dict:
        if self.use_tracemalloc:
            tracemalloc.stop()
        return {"peak_rss_mib": self.peak_rss_mib(), "tracemalloc": self.use_tracemalloc,
                "by_section": self.sections}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("vtpm-driver", "keystoneauth1", "python-barbicanclient", "castellan",
                 "oslo.context", "libvirt-python"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    try:
        from vtpm_driver.virt.probe import LibvirtHostProbe

        with LibvirtHostProbe("qemu:///system") as probe:
            found = probe.versions()
        out["libvirtd"] = found.get("libvirt")
        out["qemu"] = found.get("qemu")
    except Exception:  # versions are informative only
        out["libvirtd"] = None
    return out


class _Skip(Exception):
    """A section's prerequisites are missing."""


def _section(report: dict, name: str, fn: Callable[[], dict], memory: MemoryTracker) -> None:
    """Run one section; record its result, skip reason or error, and its duration."""
    t0 = time.perf_counter()
    try:
        result = fn()
    except _Skip as skip:
        result = {"skipped": str(skip)}
    except Exception as exc:  # one broken section must not hide the others
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["duration_s"] = round(time.perf_counter() - t0, 2)
    report[name] = result
    memory.section_done(name)
    print(f"[bench] {name} done in {result['duration_s']} s", file=sys.stderr, flush=True)


def run(settings: Settings, sections: tuple[str, ...], source_addr: str,
        use_tracemalloc: bool) -> dict:
    """Run the chosen sections and return the full report."""
    from bench import boot_bench, keymgr_bench, manufacture_bench, scale_bench

    started = time.perf_counter()
    memory = MemoryTracker(use_tracemalloc)
    report: dict[str, Any] = {
        "schema": 1,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "versions": _versions(),
        "settings": dataclasses.asdict(settings),
        "sections": list(sections),
    }
    pinned = services.source_addr_usable(source_addr)
    report["request_attribution"] = (
        f"source address {source_addr}" if pinned else
        "none: every request in the window is counted (a shared stack inflates counts)")
    counter_source = source_addr if pinned else None

    stack_problem = None
    try:
        services.check_stack()
        clouds = services.load_clouds()
    except services.StackUnavailable as exc:
        stack_problem = str(exc)

    ctx_holder: dict[str, Any] = {}

    def need_stack() -> Any:
        if stack_problem:
            raise _Skip(stack_problem)
        if "ctx" not in ctx_holder:
            ctx_holder["ctx"] = keymgr_bench.owner_context(clouds["owner"])
        return ctx_holder["ctx"]

    def counter() -> services.AccessLogCounter:
        return services.AccessLogCounter(source_addr=counter_source)

    def keymgr_section() -> dict:
        need_stack()
        return keymgr_bench.run(settings.keymgr_runs, counter())

    def scale_section() -> dict:
        ctx = need_stack()
        out: dict[str, Any] = {}
        out["preparations"] = scale_bench.run_preparations(
            ctx, list(settings.prep_levels), settings.prep_tasks, counter())
        with tempfile.TemporaryDirectory(prefix="vtpm-bench-") as tmp:
            out["init_host"] = scale_bench.run_init_host(
                list(settings.init_host_levels), settings.init_host_repeats, tmp)
        return out

    def boot_section() -> dict:
        ctx = need_stack()
        try:
            boot_bench.check_available()
        except boot_bench.BootUnavailable as exc:
            raise _Skip(str(exc)) from None
        return boot_bench.run(ctx, settings.boot_runs, list(settings.spawn_concurrency))

    def manufacture_section() -> dict:
        try:
            manufacture_bench.check_available()
        except manufacture_bench.ManufactureUnavailable as exc:
            raise _Skip(str(exc)) from None
        return manufacture_bench.run(settings.manufacture_runs)

    runners = {"keymgr": keymgr_section, "scale": scale_section, "boot": boot_section,
               "manufacture": manufacture_section}
    with _pinned(source_addr if pinned else None):
        for name in SECTIONS:
            if name in sections:
                _section(report, name, runners[name], memory)
    report["memory"] = memory.report()
    report["duration_s"] = round(time.perf_counter() - started, 2)
    report["targets"] = targets.evaluate(report)
    return report


def _pinned(addr: str | None) -> Any:
    return services.pinned_source_address(addr) if addr else contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        build_parser().error(f"unknown section(s) {sorted(unknown)}; known: {list(SECTIONS)}")
    settings = settings_from(args)
    report = run(settings, args.sections, args.source_addr, args.tracemalloc)
    text = json.dumps(report, indent=2, sort_keys=False)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    sys.stderr.write(summary.render(report))
    if any("error" in report.get(s, {}) for s in args.sections):
        return EXIT_SECTION_FAILED
    if args.check_targets and any(t["met"] is False for t in report["targets"]):
        return EXIT_TARGET_MISSED
    return 0
