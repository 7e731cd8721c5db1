"""The short human summary of a report (stderr): a few lines per section."""

from __future__ import annotations

from typing import Any

from bench.keymgr_bench import OPERATIONS


def _ms(summary: dict | None) -> str:
    if not summary or not summary.get("runs"):
        return "-"
    return (f"{summary['median']:.1f} ms (n={summary['runs']}, "
            f"p90 {summary['p90']:.1f}, max {summary['max']:.1f})")


def _s(summary: dict | None) -> str:
    if not summary or not summary.get("runs"):
        return "-"
    return f"{summary['median']:.2f} s (n={summary['runs']}, min {summary['min']:.2f}, " \
           f"max {summary['max']:.2f})"


def _status(section: Any) -> str | None:
    if not isinstance(section, dict):
        return "not run"
    if "skipped" in section:
        return f"skipped: {section['skipped']}"
    if "error" in section:
        return f"FAILED: {section['error']}"
    return None


def _keymgr(section: dict) -> list[str]:
    lines = [f"key manager ({section['runs_per_operation']} runs/op; median latency; "
             "requests per op Keystone+Barbican [+ token checks by Barbican]):"]
    for name, path in section["paths"].items():
        parts = []
        for op in OPERATIONS:
            r = path[op]["requests"]
            parts.append(f"{op} {path[op]['latency_ms']['median']:.1f} ms "
                         f"{r['keystone_per_op']:g}+{r['barbican_per_op']:g}"
                         f"[+{r['keystone_by_barbican_per_op']:g}]")
        lines.append(f"  {name:<24} " + "  ".join(parts))
    for name, reason in section.get("paths_skipped", {}).items():
        lines.append(f"  {name:<24} skipped: {reason}")
    for name, ratios in section.get("vs_floor", {}).items():
        lines.append(f"  {name:<24} x floor: " + "  ".join(
            f"{op} {ratios[op]}" for op in OPERATIONS))
    return lines


def _scale(section: dict) -> list[str]:
    lines = []
    prep = section.get("preparations", {})
    for lv in prep.get("levels", []):
        lines.append(f"  prep x{lv['concurrency']:<3} {lv['throughput_per_s']}/s, "
                     f"{lv['failures']} failed of {lv['preparations']}, "
                     f"latency {_ms(lv['latency_ms'])}")
    ih = section.get("init_host", {})
    for point in ih.get("points", []):
        lines.append(f"  init_host, {point['domains']:>4} bench domains "
                     f"({point.get('domains_on_host')} on host): "
                     f"enabled {point['swtpm_enabled']['latency_ms'].get('median')} ms, "
                     f"disabled {point['swtpm_disabled']['latency_ms'].get('median')} ms "
                     f"({point['swtpm_disabled']['outcome']})")
    for mode, fit in (ih.get("fit") or {}).items():
        if fit:
            lines.append(f"  init_host fit ({mode}): {fit['intercept_ms']:.1f} ms + "
                         f"{fit['per_item_ms']:.3f} ms/domain, R2 {fit['r2']}, "
                         f"{fit.get('shape', '')}")
    return ["scale:", *lines]


def _boot(section: dict) -> list[str]:
    lines = ["boot (spawn/power_on call -> VTPM_RESULT on the console):"]
    for kind in ("no_tpm", "no_tpm_later_boot", "vtpm_first_boot", "vtpm_later_boot"):
        entry = section.get(kind, {})
        call = (entry.get("call_s") or {}).get("median")
        lines.append(f"  {kind:<17} {_s(entry.get('latency_s'))}  call returned after "
                     f"{call if call is not None else '-'} s; guest saw "
                     f"{', '.join(entry.get('guest_saw', []))}")
    for key, label in (("overhead_ratio_vs_no_tpm", "raw"),
                       ("overhead_ratio_vs_no_tpm_adjusted",
                        f"no-TPM guest's {section.get('no_tpm_guest_wait_s')} s wait removed")):
        ratios = section.get(key, {})
        lines.append(f"  overhead vs no TPM ({label}): "
                     + ", ".join(f"{k} x{v}" for k, v in ratios.items()))
    extra = section.get("host_side_extra_s", {})
    lines.append("  host-side extra for a vTPM (driver call): "
                 + ", ".join(f"{k} +{v} s" for k, v in extra.items()))
    for c in section.get("concurrent_spawns", []):
        lines.append(f"  {c['concurrency']} concurrent spawns: all done in {c['wall_s']} s, "
                     f"{c['failures']} failed")
    return lines


def _manufacture(section: dict) -> list[str]:
    lines = ["manufacture (swtpm_setup as libvirt runs it, TPM 2.0, encrypted state):"]
    for name, args in section.get("variants", {}).items():
        lines.append(f"  {name:<10} {_s(section.get(name))}  ({args})")
    share = section.get("share_s", {})
    lines.append("  of which: " + ", ".join(f"{k} +{v} s" for k, v in share.items())
                 + "; the rest is swtpm_setup itself (see bench/README.md)")
    return lines


def render(report: dict) -> str:
    lines = [f"vtpm-driver bench: {report.get('duration_s')} s on {report['host']['cpus']} "
             f"CPUs; requests attributed by {report.get('request_attribution')}"]
    renderers = {"keymgr": _keymgr, "scale": _scale, "boot": _boot,
                 "manufacture": _manufacture}
    for name, render_section in renderers.items():
        if name not in report.get("sections", []):
            continue
        status = _status(report.get(name))
        lines.extend([f"{name}: {status}"] if status else render_section(report[name]))
    mem = report.get("memory", {})
    lines.append(f"memory: peak RSS {mem.get('peak_rss_mib')} MiB")
    missed = [t for t in report.get("targets", []) if t["met"] is False]
    met = sum(1 for t in report.get("targets", []) if t["met"])
    unmeasured = sum(1 for t in report.get("targets", []) if t["met"] is None)
    lines.append(f"targets: {met} met, {len(missed)} missed, {unmeasured} not measured")
    lines.extend(f"  MISSED {t['name']}: {t['measured']} (target {t['target']})" for t in missed)
    return "\n".join(lines) + "\n"
