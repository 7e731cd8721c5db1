"""Custody of a server's TPM state: which copy is current (issue 20). Pure, no I/O.

At every moment exactly one copy of a server's TPM state is current, and only
that copy is ever started. Each copy carries a *generation* (an integer):

* the live swtpm state: ``<swtpm_state_dir>/<uuid>/vtpm-generation``, ours,
  next to swtpm's ``tpm2/`` (:func:`vtpm_driver.virt.state.read_generation`);
* an off-host copy: :attr:`vtpm_driver.statestore.CopyMeta.generation`;
* a resize backup: the generation file inside its ``swtpm/`` copy, and the
  stashed pre-resize record's ``system_metadata``.

The orchestrator's own record of the server holds the current one,
``system_metadata['vtpm_generation']`` (:data:`GENERATION_KEY`): Nova's
instance in the shim (every driver call receives it, Nova saves it), the
domain's ``<metadata>`` record on a standalone host. Checking therefore costs
no request. A copy is current iff its generation equals the record's.

Every hand-over of the TPM (cold migration and resize, live migration, shelve
offload, unshelve, evacuation, a new TPM by ``rebuild --reset-tpm``, a resize
revert) advances the record FIRST (:func:`advance`), stores it, and then stamps
the copy that now is the server's TPM. Where the record names the host the TPM
is handed to (:data:`HANDOVER_KEY`, Nova's instance), a kill between the store
and the stamp leaves that host's copy exactly one generation behind the record:
it, and only it, is accepted there (:attr:`Verdict.HANDING_OVER`) and stamped by
the next start, which so finishes the hand-over. Every other copy is older than
the stored record and refused (:attr:`Verdict.OLDER`); a copy ahead of it
(:attr:`Verdict.NEWER`) means the record was rolled back: refused until an
operator decides. Never two copies that both pass.

A missing state is not a new TPM: once the record has a generation, the server's
TPM was manufactured, and a start that finds no state would manufacture another one (a
new EK; every key and sealed secret gone) while the real one may sit where an
interrupted move left it. Such a copy is :attr:`Verdict.MISSING` and refused, unless the
caller expects no state here (``absent_ok``): it makes a new TPM on purpose (a create,
``rebuild --reset-tpm``, a resize that changes the TPM) or brings the state here from a
copy it checks itself (a spawn from an off-host copy, a revert's backup, the arriving
side of a move).

Servers created before custody: a state with no generation while the record
has none either is current once (:attr:`Verdict.UNSTAMPED`) and stamped at
that start; once the record has a generation, a state without one is older
than it (it missed a hand-over) and refused.

Everything here is idempotent and side-effect free, except :func:`advance`,
:func:`set_recorded` and :func:`forget_resize`, which change only the
``system_metadata`` mapping given to them.
"""

from __future__ import annotations

import enum
from typing import Any

from vtpm_driver import exception

#: ``system_metadata`` key of the current generation (the record's).
GENERATION_KEY = "vtpm_generation"
#: ``system_metadata`` key of the generation before a resize's hand-over; a revert
#: restores the backup only if the backup has exactly this generation.
PRE_RESIZE_KEY = "vtpm_generation_before_resize"
#: ``system_metadata`` key of the host a hand-over in progress gives the TPM to (until
#: that host's copy is stamped with the record's generation).
HANDOVER_KEY = "vtpm_handover_host"
#: The generation of a new server's TPM.
FIRST = 1


class Verdict(enum.Enum):
    """What a copy is, compared with the record (:func:`judge`)."""

    CURRENT = "current"      # same generation as the record
    FRESH = "fresh"          # no TPM state yet: a new TPM will be manufactured
    UNSTAMPED = "unstamped"  # neither copy nor record has one: older server, current once
    ADOPT = "adopt"          # the record has none, the copy has one: the record takes it
    OLDER = "older"          # behind the record (or unstamped while the record is not)
    NEWER = "newer"          # ahead of the record: the record was rolled back
    MISSING = "missing"      # no state, but the record says a TPM was manufactured
    HANDING_OVER = "handing over"  # one behind, on the host the record hands it to

    @property
    def startable(self) -> bool:
        """Whether this copy may be started (or restored, or copied back)."""
        return self not in (Verdict.OLDER, Verdict.NEWER, Verdict.MISSING)


def _int(value: Any) -> int | None:
    """A stored generation as an int; None when unset or not a positive integer."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        return None
    return number if number > 0 else None


def recorded(instance: Any) -> int | None:
    """The record's current generation (``system_metadata``), None when none is recorded."""
    sysmeta = getattr(instance, "system_metadata", None) or {}
    return _int(sysmeta.get(GENERATION_KEY))


def parse(text: str | None) -> int | None:
    """A generation as stored in a file or field; None when absent or not a generation."""
    return _int(text)


def judge(record: int | None, found: int | None, *, present: bool = True,
          absent_ok: bool = False, handed_here: bool = False) -> Verdict:
    """What the copy with generation ``found`` is, against the record's ``record``.

    ``present`` False: there is no TPM state. That is a new TPM
    (:attr:`Verdict.FRESH`) for a server whose record has no generation (its
    first start), where a generation stands without a TPM (``found``: the
    place was prepared for a new TPM, by a create or a reset, and a start
    manufactures it there), or when the caller expects no state here
    (``absent_ok``: it makes a new TPM on purpose, or brings the state from
    a copy it checks itself). Otherwise nothing of the
    server's TPM is here: it is missing (:attr:`Verdict.MISSING`).
    ``handed_here``: the record names this host as the one a hand-over in
    progress gives the TPM to; its copy exactly one generation behind is that
    hand-over's, not yet stamped (:attr:`Verdict.HANDING_OVER`).
    """
    if not present:
        made_here = record is None or absent_ok or found is not None
        return Verdict.FRESH if made_here else Verdict.MISSING
    if record is None:
        return Verdict.UNSTAMPED if found is None else Verdict.ADOPT
    if handed_here and found is not None and found == record - 1:
        return Verdict.HANDING_OVER
    if found is None or found < record:
        return Verdict.OLDER
    if found > record:
        return Verdict.NEWER
    return Verdict.CURRENT


def check(instance: Any, found: int | None, *, copy: str, doing: str = "start",
          present: bool = True, absent_ok: bool = False, allow_stale: bool = False,
          record: int | None = None, host: str | None = None) -> Verdict:
    """Refuse to start, restore or copy back a copy that is not the current one.

    ``copy`` names the copy for the message (``"the swtpm state
    /var/lib/libvirt/swtpm/<uuid> on host h1"``, ``"the off-host copy in
    /srv/store"``). ``record`` overrides the record's generation (a resize
    revert compares the backup with the pre-resize one). ``present`` and
    ``absent_ok``: see :func:`judge`. ``host``: where this copy is (a live
    state's host), matched against the record's hand-over (:data:`HANDOVER_KEY`). ``allow_stale``
    (``[vtpm] allow_stale_tpm_state``): an older, newer or missing copy is
    accepted (the caller logs it) instead of refused.

    :returns: the verdict (never OLDER/NEWER/MISSING unless ``allow_stale``).
    :raises StaleTPMState: names the server, the copy, both generations and
        what to do.
    """
    expected = recorded(instance) if record is None else record
    handed_here = host is not None and handover_host(instance) == host and record is None
    verdict = judge(expected, found, present=present, absent_ok=absent_ok,
                    handed_here=handed_here)
    if verdict.startable or allow_stale:
        return verdict
    raise exception.StaleTPMState(refusal(instance, copy, doing, found, expected, verdict),
                                  copy=copy, found=found, current=expected)


def refusal(instance: Any, copy: str, doing: str, found: int | None, current: int | None,
            verdict: Verdict) -> str:
    """The refusal's text: server, copy, both generations, why, and what to do."""
    label = f"{getattr(instance, 'name', '?')!r} ({getattr(instance, 'uuid', '?')})"
    if verdict is Verdict.MISSING:
        return (f"refusing to {doing} server {label}: there is no TPM state in {copy}, but "
                f"the server's record says its TPM (generation {current}) exists; a start "
                "would manufacture a new TPM (new endorsement key, every key and sealed "
                "secret of the old one lost). Find the state where the server was last "
                "moved from or to (an interrupted migration leaves it in the instance's "
                "'_resize' directory) and put it back; to give the server a new TPM on "
                "purpose, rebuild it with a TPM reset, or set [vtpm] allow_stale_tpm_state "
                "= True for this operation")
    shown = "none (taken before custody)" if found is None else str(found)
    if verdict is Verdict.NEWER:
        why = ("it is ahead of the record: the record was rolled back or a hand-over "
               "was interrupted")
    else:
        why = ("it is older than the current copy: starting it would roll the TPM back "
               "(NV counters, lockout, keys made since) or run a second copy of it")
    return (f"refusing to {doing} server {label} from {copy}: its TPM generation is "
            f"{shown}, the server's record says generation {current} is current; {why}. "
            "The current copy is where the server was last moved, restored or resized to: "
            "use that one. If this copy really is the latest state (an interrupted "
            "hand-over), set [vtpm] allow_stale_tpm_state = True for this operation")


def settled(instance: Any, found: int | None) -> int:
    """The generation a copy accepted by :func:`check` is stamped with, and the record holds.

    The record's; with none recorded, the copy's (:attr:`Verdict.ADOPT`) or
    :data:`FIRST` (a new server, or one older than custody).
    """
    current = recorded(instance)
    if current is not None:
        return current
    return found if found is not None else FIRST


def set_recorded(instance: Any, generation: int) -> None:
    """Record ``generation`` as current in the instance's ``system_metadata`` (not saved)."""
    instance.system_metadata[GENERATION_KEY] = str(int(generation))


def advance(instance: Any, *, resize: bool = False, to_host: str | None = None) -> int:
    """A hand-over: the record's generation + 1 (``FIRST`` + 1 without one); returns it.

    Call it BEFORE stamping the copy that is handed over, and store the record
    before the stamp (the standalone domain's define; in Nova
    :func:`vtpm_driver.ops.custody.hand_over` saves the instance): at no moment
    does an older copy match the stored record. ``to_host``: the host whose copy
    is handed the TPM (:data:`HANDOVER_KEY`, until :func:`handed_over`).
    ``resize``: the previous generation is kept in :data:`PRE_RESIZE_KEY` for a
    revert. Not idempotent.
    """
    before = recorded(instance)
    new = (before if before is not None else FIRST) + 1
    if resize and PRE_RESIZE_KEY not in instance.system_metadata:
        instance.system_metadata[PRE_RESIZE_KEY] = str(before if before is not None else FIRST)
    set_recorded(instance, new)
    if to_host is not None:
        instance.system_metadata[HANDOVER_KEY] = to_host
    return new


def handover_host(instance: Any) -> str | None:
    """The host a hand-over in progress gives the TPM to (None: none in progress)."""
    sysmeta = getattr(instance, "system_metadata", None) or {}
    return sysmeta.get(HANDOVER_KEY) or None


def handed_over(instance: Any) -> None:
    """The handed-over copy carries the record's generation: the hand-over is done.

    Changes only ``system_metadata`` (the caller stores it). Idempotent.
    """
    instance.system_metadata.pop(HANDOVER_KEY, None)


def pre_resize(instance: Any) -> int | None:
    """The generation the backup of a resize in progress must have (a revert's expectation).

    :data:`PRE_RESIZE_KEY` once the resize handed the TPM over, else the
    record's own (the hand-over has not happened: the backup is as current).
    """
    sysmeta = getattr(instance, "system_metadata", None) or {}
    stored = _int(sysmeta.get(PRE_RESIZE_KEY))
    return stored if stored is not None else recorded(instance)


def forget_resize(instance: Any) -> None:
    """A resize is confirmed or reverted: its pre-resize generation is dropped. Idempotent."""
    instance.system_metadata.pop(PRE_RESIZE_KEY, None)
