"""Helpers shared by every ``vtpm-driver`` command module.

Kept free of cliff ``App`` details so command modules only import this and
the package API.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence

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
