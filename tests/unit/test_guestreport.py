"""The guest's VTPM_RESULT line: parsed once for the demo, the benchmarks and the tests."""

from __future__ import annotations

from vtpm_driver import guestreport

LINE = "VTPM_RESULT version=2 driver=tpm_crb getrandom_rc=0 ek=" + "a" * 64


def test_every_result_line_oldest_first():
    text = f"[    0.1] boot\r\n{LINE}\r\nnoise\nVTPM_RESULT version=none\n"
    results = guestreport.parse_vtpm_results(text)
    assert [r["version"] for r in results] == ["2", "none"]
    assert results[0] == {"version": "2", "driver": "tpm_crb", "getrandom_rc": "0",
                          "ek": "a" * 64}
    assert guestreport.last_result(text) == {"version": "none"}
    assert guestreport.last_result("no result here\n") is None


def test_a_line_must_end_with_its_fields():
    assert guestreport.parse_vtpm_results("VTPM_RESULT version=2 trailing junk!\n") == []
    assert guestreport.parse_vtpm_results("VTPM_RESULT\n") == []


def test_results_since_counts_only_complete_lines_already_seen():
    before = f"{LINE}\nVTPM_RESULT version=1."  # the second line was still being written
    now = f"{LINE}\nVTPM_RESULT version=1.2\n"
    assert guestreport.results_since(before, now) == [{"version": "1.2"}]


def test_results_since_a_new_file_reads_it_all():
    assert guestreport.results_since(f"{LINE}\n", "VTPM_RESULT version=2\n") == [
        {"version": "2"}]


def test_result_line_round_trips():
    (result,) = guestreport.parse_vtpm_results(LINE)
    assert guestreport.result_line(result) == LINE
