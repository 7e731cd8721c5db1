"""Shared command-line helpers: progress lines, argparse types, output columns."""

from __future__ import annotations

import argparse
import io

import pytest

from vtpm_driver import exception
from vtpm_driver.cli.common import (
    DictColumn,
    ListColumn,
    int_at_least,
    positive_float,
    progress,
    show_columns,
)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal():
    tty, pipe = _Tty(), io.StringIO()
    for stream in (tty, pipe):
        with progress(stream, "Starting server vm1"):
            pass
    assert tty.getvalue().startswith("Starting server vm1... done (")
    assert pipe.getvalue() == ""


def test_progress_says_failed_and_reraises():
    tty = _Tty()
    with pytest.raises(exception.VirtError), progress(tty, "Starting"):
        raise exception.VirtError("boom")
    assert tty.getvalue() == "Starting... failed\n"


def test_progress_can_be_disabled():
    tty = _Tty()
    with progress(tty, "Starting", enabled=False):
        pass
    assert tty.getvalue() == ""


def test_int_at_least_accepts_the_bound_and_names_it_when_refusing():
    assert int_at_least(0)("0") == 0
    assert int_at_least(1)("7") == 7
    for parse, text, wanted in ((int_at_least(0), "-1", "an integer >= 0"),
                                (int_at_least(1), "0", "a positive integer"),
                                (int_at_least(1), "1.5", "a positive integer")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected {wanted}, got '{text}'"):
            parse(text)


def test_positive_float_names_the_unit():
    seconds = positive_float("seconds")
    assert seconds("2.5") == 2.5
    for text, wanted in (("0", "a positive number of seconds"), ("-1", "a positive number"),
                         ("soon", "a number of seconds"), ("nan", "a positive number")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected {wanted}"):
            seconds(text)


def test_show_columns_keeps_order_and_wraps_mappings_and_lists():
    columns, values = show_columns({"name": "vm1", "specs": {"a": "1"}, "traits": ["T"],
                                    "vcpus": 2})
    assert columns == ("name", "specs", "traits", "vcpus")
    assert values[0] == "vm1" and values[3] == 2
    assert isinstance(values[1], DictColumn) and values[1].human_readable() == "a=1"
    assert isinstance(values[2], ListColumn) and values[2].machine_readable() == ["T"]
