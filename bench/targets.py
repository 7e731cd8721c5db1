"""The project's speed and cost targets, checked against a finished report.

Targets live here and only here: tests never assert timings (a loaded CI
machine would make them flaky). Request counts are exact targets (SPEC D7);
latencies are ratios against a baseline measured in the same run, so they
hold on a slow machine too. A target whose section did not run is ``None``
(not met, not missed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MiB = 1024

# (name, what is promised, getter of the measured value, check)
Target = tuple[str, str, Callable[[dict], Any], Callable[[Any], bool]]


def _get(report: dict, *keys: Any) -> Any:
    node: Any = report
    for key in keys:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and -len(node) <= key < len(node):
            node = node[key]
        else:
            return None
    return node


def _ours_requests(op: str, service: str) -> Callable[[dict], Any]:
    return lambda r: _get(r, "keymgr", "paths", "ours", op, "requests", f"{service}_per_op")


def _prep_levels(report: dict) -> list[dict]:
    return _get(report, "scale", "preparations", "levels") or []


def _throughput_keeps_up(report: dict) -> float | None:
    levels = {lv["concurrency"]: lv.get("throughput_per_s") for lv in _prep_levels(report)}
    if 1 not in levels or not levels[1] or len(levels) < 2:
        return None
    return round(min(v or 0.0 for v in levels.values()) / levels[1], 2)


TARGETS: list[Target] = [
    ("keymgr.ours.create.barbican_requests", "== 2 (POST + owner-only ACL PUT)",
     _ours_requests("create", "barbican"), lambda v: v == 2),
    ("keymgr.ours.unlock.barbican_requests", "== 1 (payload GET)",
     _ours_requests("unlock", "barbican"), lambda v: v == 1),
    ("keymgr.ours.delete.barbican_requests", "== 1 (DELETE)",
     _ours_requests("delete", "barbican"), lambda v: v == 1),
    *[(f"keymgr.ours.{op}.keystone_requests", "== 0 (token and endpoint known)",
       _ours_requests(op, "keystone"), lambda v: v == 0) for op in ("create", "unlock", "delete")],
    *[(f"keymgr.ours.{op}.median_vs_floor", "<= 1.5 x the raw-requests floor",
       (lambda r, op=op: _get(r, "keymgr", "vs_floor", "ours", op)), lambda v: v <= 1.5)
      for op in ("create", "unlock", "delete")],
    ("keymgr.ours.unlock.median_vs_castellan_nova", "<= 1.0 x castellan (Nova's path)",
     lambda r: _ratio(_get(r, "keymgr", "paths", "ours", "unlock", "latency_ms", "median"),
                      _get(r, "keymgr", "paths", "castellan_nova_context", "unlock",
                           "latency_ms", "median")),
     lambda v: v <= 1.0),
    ("boot.vtpm_first_boot.overhead_ratio", "<= 1.5 x the no-TPM boot",
     lambda r: _get(r, "boot", "overhead_ratio_vs_no_tpm_adjusted", "vtpm_first_boot"),
     lambda v: v <= 1.5),
    ("boot.vtpm_later_boot.overhead_ratio", "<= 1.25 x the no-TPM boot",
     lambda r: _get(r, "boot", "overhead_ratio_vs_no_tpm_adjusted", "vtpm_later_boot"),
     lambda v: v <= 1.25),
    ("boot.vtpm_first_boot.host_side_extra_s", "<= 1.5 s more driver time than no TPM",
     lambda r: _get(r, "boot", "host_side_extra_s", "vtpm_first_boot"), lambda v: v <= 1.5),
    ("boot.vtpm_later_boot.host_side_extra_s", "<= 0.5 s more driver time than no TPM",
     lambda r: _get(r, "boot", "host_side_extra_s", "vtpm_later_boot"), lambda v: v <= 0.5),
    ("boot.first_boot_extra_vs_later_boot_s",
     "<= 0.3 s more host-side time for a first boot than for a later one (issue 22)",
     lambda r: _minus(_get(r, "boot", "host_side_extra_s", "vtpm_first_boot"),
                      _get(r, "boot", "host_side_extra_s", "vtpm_later_boot")),
     lambda v: v <= 0.3),
    ("scale.preparations.failures", "== 0 at every concurrency",
     lambda r: sum(lv.get("failures", 0) for lv in _prep_levels(r)) if _prep_levels(r)
     else None, lambda v: v == 0),
    ("scale.preparations.throughput_vs_serial", ">= 0.8 (concurrency never collapses it)",
     _throughput_keeps_up, lambda v: v >= 0.8),
    ("scale.init_host.swtpm_enabled.per_domain_ms", "<= 1 ms per defined vTPM domain",
     lambda r: _get(r, "scale", "init_host", "fit", "swtpm_enabled", "per_item_ms"),
     lambda v: v <= 1.0),
    ("scale.init_host.swtpm_disabled.per_domain_ms", "<= 1 ms per defined vTPM domain",
     lambda r: _get(r, "scale", "init_host", "fit", "swtpm_disabled", "per_item_ms"),
     lambda v: v <= 1.0),
    ("memory.peak_rss_mib", "<= 200 MiB for the benchmark process",
     lambda r: _get(r, "memory", "peak_rss_mib"), lambda v: v <= 200),
]


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return round(a / b, 2)


def evaluate(report: dict) -> list[dict]:
    """Each target with its measured value and ``met`` (None when not measured)."""
    out = []
    for name, promise, getter, check in TARGETS:
        value = getter(report)
        out.append({"name": name, "target": promise, "measured": value,
                    "met": None if value is None else bool(check(value))})
    return out
