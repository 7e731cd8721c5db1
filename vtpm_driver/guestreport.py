"""The test guest's one-line report: ``VTPM_RESULT key=value ...`` on its console.

The guest of ``tools/build-guest.sh`` prints, once per boot, a line such as
``VTPM_RESULT version=2 driver=tpm_crb getrandom_rc=0 ek=<sha256> sealed=<sha256>
sealed_at=kept pcr7=<sha256>`` to its serial console (``tools/guest/README.md``).
The demo, the benchmarks and the functional tests all read it through this
module, so the protocol is parsed in one place. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

#: A result line: ``VTPM_RESULT`` then ``key=value`` words up to the end of the line.
RESULT_RE = re.compile(r"VTPM_RESULT((?: +[a-z_][a-z0-9_]*=\S*)+) *$")


def parse_vtpm_results(text: str) -> list[dict[str, str]]:
    """Every ``VTPM_RESULT`` line of a console log (one per boot), oldest first."""
    results = []
    for line in text.splitlines():
        match = RESULT_RE.search(line.rstrip("\r"))
        if match:
            results.append(dict(item.split("=", 1) for item in match.group(1).split()))
    return results


def last_result(text: str) -> dict[str, str] | None:
    """The fields of the last result line in ``text``, or None when there is none."""
    results = parse_vtpm_results(text)
    return results[-1] if results else None


def results_since(before: str, now: str) -> list[dict[str, str]]:
    """Result lines printed after ``before`` was read from the same console log.

    libvirt appends to the file, but a driver may also start each boot with a
    new one: if ``now`` does not continue ``before`` the whole file is new.
    Only complete lines of ``before`` count as already seen.
    """
    seen = before[: before.rfind("\n") + 1]
    if seen and now.startswith(seen):
        return parse_vtpm_results(now[len(seen):])
    return parse_vtpm_results(now)


def result_line(result: Mapping[str, str]) -> str:
    """A parsed result as the guest printed it."""
    return "VTPM_RESULT " + " ".join(f"{key}={value}" for key, value in result.items())


class GuestTPM(NamedTuple):
    """The TPM as its guest knows it: its endorsement key, the value the guest sealed in
    it under a PCR 7 policy (sha256), and PCR 7 itself (``none`` where not reported)."""

    ek: str
    sealed: str
    pcr7: str


def tpm_of(result: Mapping[str, str]) -> GuestTPM:
    """The TPM a result line shows.

    Two reports show the same TPM, with what its guest kept in it, when these are
    equal; a TPM manufactured anew has another EK, and what the guest sealed in the old
    one is gone (it seals a new value, ``sealed_at=new``).
    """
    return GuestTPM(*(result.get(field, "none") for field in GuestTPM._fields))
