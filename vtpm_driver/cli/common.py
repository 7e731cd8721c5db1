"""Helpers shared by every ``vtpm-driver`` command module.

Kept free of cliff ``App`` details so command modules only import this and
the package API.
"""

from __future__ import annotations

import argparse
import contextlib
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TextIO

from cliff._argparse import SmartHelpFormatter
from cliff.columns import FormattableColumn


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``; anything else is a usage error."""
    wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


def positive_float(what: str) -> Callable[[str], float]:
    """An argparse ``type``: a number > 0 of ``what`` (e.g. "seconds")."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number of {what}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(
                f"expected a positive number of {what}, got {text!r}")
        return value

    return parse


def key_value(text: str) -> tuple[str, str]:
    """argparse ``type=`` for ``KEY=VALUE`` options (split at the first ``=``).

    A malformed value is a usage error (exit 2) naming the option and the value.
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_property_options(parser: argparse.ArgumentParser) -> None:
    """``--flavor-property K=V`` and ``--image-property K=V``, repeatable.

    A key given twice keeps its last value, as in python-openstackclient.
    """
    parser.add_argument(
        "--flavor-property", metavar="KEY=VALUE", dest="flavor_properties",
        action="append", type=key_value, default=[],
        help="Flavor extra spec, e.g. hw:tpm_version=2.0 (repeat for more)",
    )
    parser.add_argument(
        "--image-property", metavar="KEY=VALUE", dest="image_properties",
        action="append", type=key_value, default=[],
        help="Image property, e.g. hw_tpm_model=tpm-crb (repeat for more)",
    )


class ListColumn(FormattableColumn[list]):
    """A list: one item per line in tables, a JSON list with ``-f json``."""

    def __init__(self, value: Sequence[object]) -> None:
        super().__init__(list(value))

    def human_readable(self) -> str:
        return "\n".join(str(item) for item in self._value)


class DictColumn(FormattableColumn[dict]):
    """A mapping: ``key=value`` lines in tables, a JSON object with ``-f json``."""

    def __init__(self, value: Mapping[str, object]) -> None:
        super().__init__(dict(value))

    def human_readable(self) -> str:
        return "\n".join(f"{key}={value}" for key, value in self._value.items())


def show_columns(fields: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple]:
    """``ShowOne`` output of plain fields: mappings and lists become columns."""
    def column(value: Any) -> Any:
        if isinstance(value, Mapping):
            return DictColumn(value)
        if isinstance(value, list | tuple):
            return ListColumn(value)
        return value

    return tuple(fields), tuple(column(value) for value in fields.values())


def isatty(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (False for anything that cannot tell)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress(stream: TextIO, message: str, enabled: bool = True) -> Iterator[None]:
    """``message... done (1.2 s)`` on ``stream``, only when it is a terminal."""
    show = enabled and isatty(stream)
    if show:
        stream.write(f"{message}...")
        stream.flush()
    started = time.monotonic()
    try:
        yield
    except BaseException:
        if show:
            stream.write(" failed\n")
            stream.flush()
        raise
    if show:
        stream.write(f" done ({time.monotonic() - started:.1f} s)\n")
        stream.flush()


class ParagraphHelpFormatter(SmartHelpFormatter):
    """Keeps a command description's paragraphs and indented (example) lines.

    argparse would run the whole docstring together into one paragraph.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in textwrap.dedent(text).strip().split("\n\n"):
            lines = block.splitlines()
            if any(line.startswith((" ", "-")) for line in lines):
                blocks.append("\n".join(indent + line for line in lines))
            else:
                blocks.append(super()._fill_text(" ".join(lines), width, indent))
        return "\n\n".join(blocks)


class CommandMixin:
    """What our commands share: readable help, and usage rules argparse cannot express.

    Put it first among a command's bases. A command whose options combine in
    ways argparse cannot check overrides :meth:`usage_problem`; a message it
    returns is a usage error (exit 2), reported before the command runs.
    """

    app: Any

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)  # type: ignore[misc]
        parser.formatter_class = ParagraphHelpFormatter
        self._parser = parser
        return parser

    def usage_problem(self, parsed_args: argparse.Namespace) -> str | None:
        """Why these options do not go together, or None."""
        return None

    def run(self, parsed_args: argparse.Namespace) -> int:
        problem = self.usage_problem(parsed_args)
        if problem:
            self._parser.error(problem)  # exits 2 with the command's usage line
        return super().run(parsed_args)  # type: ignore[misc]
