"""The benchmark harness runs end to end and writes a well-formed report.

Only the report's structure and counts are checked here, never timings:
speed targets live in bench/targets.py and are judged by ``python -m bench``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import stats, targets

# The report counts the shared Keystone/Barbican's requests per operation: run alone.
pytestmark = pytest.mark.alone

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICK_RUNS = 3  # Settings.quick().keymgr_runs
OPS = ("create", "unlock", "delete")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory, keymgr_stack, libvirt_conn, test_guest):
    """``python -m bench --quick --output FILE``: its report, stderr and exit code."""
    out = tmp_path_factory.mktemp("bench") / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, f"bench exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    assert proc.stdout == "", "with --output the report must not also go to stdout"
    return json.loads(out.read_text()), proc.stderr


def test_report_has_every_section(quick_report):
    report, _ = quick_report
    for key in ("schema", "settings", "versions", "host", "keymgr", "scale", "boot",
                "manufacture", "memory", "targets", "duration_s", "request_attribution"):
        assert key in report, key
    for section in ("keymgr", "scale", "boot", "manufacture"):
        assert "skipped" not in report[section], report[section]
        assert "error" not in report[section], report[section]
    assert report["settings"]["keymgr_runs"] == QUICK_RUNS


def test_keymgr_paths_record_runs_and_requests(quick_report):
    km = quick_report[0]["keymgr"]
    assert km["runs_per_operation"] == QUICK_RUNS
    expected = {"ours", "floor"}
    if importlib.util.find_spec("castellan") is not None:
        expected |= {"castellan_nova_context", "castellan_token_context"}
    else:
        assert set(km["paths_skipped"]) == {"castellan_nova_context", "castellan_token_context"}
    assert expected <= set(km["paths"])
    for name in expected:
        path = km["paths"][name]
        assert path["first_call_requests"]["barbican"] > 0, name
        assert "cleanup_failures" not in path, name
        for op in OPS:
            assert path[op]["latency_ms"]["runs"] == QUICK_RUNS, (name, op)
            for stat in ("median", "min", "p90", "max", "iqr"):
                assert stat in path[op]["latency_ms"], (name, op, stat)
            requests = path[op]["requests"]
            assert requests["barbican"] >= QUICK_RUNS, (name, op, requests)
            assert requests["errors"] == 0, (name, op, requests)
    # Our path's counts are exact (SPEC D7) when our requests can be told apart.
    if km["paths"]["ours"]["create"]["requests"]["foreign"] == 0:
        ours = km["paths"]["ours"]
        assert [ours[op]["requests"]["barbican_per_op"] for op in OPS] == [2, 1, 1]
        assert [ours[op]["requests"]["keystone_per_op"] for op in OPS] == [0, 0, 0]
    assert set(km["vs_floor"]) == expected - {"floor"}


def test_scale_section_counts_and_cleans_up(quick_report, libvirt_conn):
    report = quick_report[0]
    prep = report["scale"]["preparations"]
    assert [lv["concurrency"] for lv in prep["levels"]] == list(report["settings"]["prep_levels"])
    for lv in prep["levels"]:
        assert lv["succeeded"] == lv["preparations"] > 0, lv
        assert lv["failures"] == 0 and lv["cleanup_failures"] == 0, lv
        assert lv["latency_ms"]["runs"] == lv["preparations"]
        assert lv["requests"]["barbican"] >= 2 * lv["preparations"]
    ih = report["scale"]["init_host"]
    levels = report["settings"]["init_host_levels"]
    assert [p["domains"] for p in ih["points"]] == [0, *levels]
    for point in ih["points"]:
        for mode in ("swtpm_enabled", "swtpm_disabled"):
            assert point[mode]["latency_ms"]["runs"] == report["settings"]["init_host_repeats"]
    assert ih["domains_undefined"] == max(levels)
    assert set(ih["fit"]) == {"swtpm_enabled", "swtpm_disabled"}
    names = [d.name() for d in libvirt_conn.listAllDomains(0)]
    assert not [n for n in names if n.startswith("vtpm-bench-")], names


def test_boot_section_saw_the_tpm(quick_report):
    boot = quick_report[0]["boot"]
    runs = boot["runs"]
    assert runs >= 1
    for kind in ("no_tpm", "no_tpm_later_boot", "vtpm_first_boot", "vtpm_later_boot"):
        assert boot[kind]["latency_s"]["runs"] == runs, kind
        assert boot[kind]["call_s"]["runs"] == runs, kind
    assert all("version=none" in s for s in boot["no_tpm"]["guest_saw"])
    assert all("version=2" in s for s in boot["vtpm_first_boot"]["guest_saw"])
    assert all("version=2" in s for s in boot["vtpm_later_boot"]["guest_saw"])
    for key in ("overhead_ratio_vs_no_tpm", "overhead_ratio_vs_no_tpm_adjusted",
                "host_side_extra_s"):
        assert set(boot[key]) == {"vtpm_first_boot", "vtpm_later_boot"}, key
    assert boot["cleanup_failures"] == 0


def test_manufacture_section_times_each_part(quick_report):
    """swtpm_setup as libvirt runs it: without EK, with the EKs, with their certificates."""
    section = quick_report[0]["manufacture"]
    assert set(section["variants"]) == {"state_only", "ek", "ek_certs"}
    for name in section["variants"]:
        assert section[name]["runs"] == section["runs"] >= 1, name
    assert set(section["share_s"]) == {"endorsement_keys", "certificates"}
    assert "manufacture (swtpm_setup" in quick_report[1]


def test_memory_targets_and_summary(quick_report):
    report, stderr = quick_report
    assert report["memory"]["peak_rss_mib"] > 0
    assert set(report["memory"]["by_section"]) == {"keymgr", "scale", "boot", "manufacture"}
    assert [t["name"] for t in report["targets"]] == [t[0] for t in targets.TARGETS]
    for target in report["targets"]:
        assert set(target) == {"name", "target", "measured", "met"}
    assert "targets:" in stderr and "key manager" in stderr


# --- the pure helpers the report is built with ------------------------------------------

def test_summarize_and_percentiles():
    s = stats.summarize([0.004, 0.001, 0.003, 0.002], scale=1000.0)
    assert s == {"runs": 4, "median": 2.5, "min": 1.0, "p25": 1.75, "p75": 3.25, "p90": 3.7,
                 "max": 4.0, "iqr": 1.5}
    assert stats.summarize([]) == {"runs": 0}
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_growth_fit_tells_flat_from_linear():
    ns = [10, 100, 1000]
    linear = stats.growth_fit(ns, [0.002 + 0.001 * n for n in ns])
    assert linear["per_item_ms"] == pytest.approx(1.0)
    assert linear["intercept_ms"] == pytest.approx(2.0)
    assert linear["growth_exponent"] == pytest.approx(1.0)
    assert linear["shape"] == "linear in N"
    quadratic = stats.growth_fit([0, 10, 100, 1000], [0.001 + 1e-6 * n * n
                                                      for n in (0, 10, 100, 1000)])
    assert quadratic["growth_exponent"] == pytest.approx(2.0)
    assert quadratic["shape"] == "super-linear in N"
    flat = stats.growth_fit(ns, [0.005, 0.005, 0.005])
    assert flat["per_item_ms"] == pytest.approx(0.0)
    assert flat["shape"].startswith("flat")
    with pytest.raises(ValueError):
        stats.growth_fit([5, 5], [1.0, 2.0])


def test_targets_unmeasured_are_none_not_missed():
    evaluated = targets.evaluate({})
    assert evaluated and all(t["met"] is None for t in evaluated)
    report = {"keymgr": {"paths": {"ours": {"unlock": {"requests": {"barbican_per_op": 2}}}}}}
    by_name = {t["name"]: t for t in targets.evaluate(report)}
    assert by_name["keymgr.ours.unlock.barbican_requests"]["met"] is False
