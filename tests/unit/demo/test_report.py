"""The demo's report lines and verdict."""

from __future__ import annotations

import io

from vtpm_driver.demo import report
from vtpm_driver.demo.report import FAIL, OK, SKIP, StepResult


def test_step_line_puts_the_status_first():
    assert report.format_step(OK, 1.5, "create server", "vm") == (
        "ok     1.50 s  create server: vm")
    assert report.format_step(SKIP, None, "delete", "not run") == (
        "skip           delete: not run")


def test_verdict_pass_counts_checks_not_the_cleanup():
    results = [StepResult("a", OK, 1.0, ""), StepResult("cleanup", OK, 0.1, "")]
    assert report.verdict(results, 3.04) == ("PASS: all 1 checks held in 3.0 s", None)


def test_verdict_fail_names_failed_and_skipped_and_the_first_failure():
    results = [StepResult("a", OK, 1.0, ""), StepResult("b", FAIL, 1.0, "why"),
               StepResult("c", SKIP, None, "not run (b failed)")]
    line, first = report.verdict(results, 2.0)
    assert line == "FAIL: 1 failed, 1 not run, of 3 checks (2.0 s): b"
    assert first is results[1]


def test_reporter_without_a_terminal_prints_only_the_lines():
    stream = io.StringIO()
    reporter = report.Reporter(stream, live=False)
    with reporter.running("slow"):
        pass
    reporter.step(StepResult("slow", OK, 0.5, "done"))
    assert stream.getvalue() == "ok     0.50 s  slow: done\n"
