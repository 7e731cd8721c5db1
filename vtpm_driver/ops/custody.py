"""Custody steps over one host's live TPM state: check before a start, stamp after a hand-over.

The rule is :mod:`vtpm_driver.model.custody` (pure); the file I/O is
:mod:`vtpm_driver.virt.state`. Both edges call these: the standalone host's
:class:`~vtpm_driver.ops.guests.Guests` (every start asks
:meth:`~vtpm_driver.ops.guests.Guests.prepare_start`) and the Nova shim
(``nova/virt/vtpm/driver.py``).

Order at a hand-over (see :func:`vtpm_driver.model.custody.advance`): the record is
advanced first, then :func:`stamp_live` writes the new generation into the
state that now is the server's TPM (when each record is stored: see ``advance``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from oslo_log import log as logging

from vtpm_driver.model import custody
from vtpm_driver.virt import state

LOG = logging.getLogger(__name__)


def live_copy(state_base: str, instance_uuid: str, host: str | None) -> str:
    """How a host's live state is named in a refusal: its directory and host."""
    where = state.state_dir(state_base, instance_uuid)
    return f"the swtpm state {where} on host {host or socket.gethostname()}"


def check_live(instance: Any, state_base: str, *, host: str | None, allow_stale: bool,
               doing: str = "start", record: int | None = None,
               absent_ok: bool = False) -> custody.Verdict:
    """Refuse to start (``doing``) the live state here unless it is the current copy.

    Read-only: call it BEFORE the guest is touched. ``record`` overrides the
    record's generation (a revert compares with the pre-resize one). No state
    here while the record has a generation is refused (the TPM is missing)
    unless ``absent_ok``: the caller makes a new TPM on purpose or brings the
    state here from a copy it checks itself.
    An accepted older copy (``allow_stale``) is logged.

    :raises StaleTPMState: names the server, this state, both generations (or that
        the state is missing).
    :raises UnsafeStatePath: the generation file is a symlink or special file.
    :raises VirtError: the state directory cannot be read.
    """
    present = state.has_tpm_state(state_base, instance.uuid)
    found = state.read_generation(state_base, instance.uuid)
    copy = live_copy(state_base, instance.uuid, host)
    verdict = custody.check(instance, found, copy=copy, doing=doing, present=present,
                            absent_ok=absent_ok, allow_stale=allow_stale, record=record,
                            host=host)
    if not verdict.startable:
        LOG.warning("Accepting %s although its TPM generation %s is not the current %s "
                    "([vtpm] allow_stale_tpm_state = True)", copy, found,
                    custody.recorded(instance) if record is None else record,
                    instance_uuid=instance.uuid)
    return verdict


def stamp_live(instance: Any, state_base: str, *, create: bool = True) -> int | None:
    """Make the live state and the record agree; returns the generation (None: not stamped).

    The state gets the record's generation (with none recorded: its own, or
    :data:`~vtpm_driver.model.custody.FIRST` for a server created before custody,
    treated as current once), written BEFORE the record takes it: a kill in
    between leaves a record without a generation, which adopts the state's.
    The instance's ``system_metadata`` is updated; the caller saves it.
    ``create`` False: nothing is written while the host has no TPM state for
    the server (the shim: Nova's start manufactures it; stamped after).
    Idempotent.

    :raises VirtError: the generation could not be written.
    """
    present = state.has_tpm_state(state_base, instance.uuid)
    if not present and not create:
        return None
    found = state.read_generation(state_base, instance.uuid)
    generation = custody.settled(instance, found if present else None)
    if found != generation:
        state.write_generation(state_base, instance.uuid, generation)
    if custody.recorded(instance) != generation:
        custody.set_recorded(instance, generation)
    if present:
        custody.handed_over(instance)
    return generation


def hand_over(instance: Any, state_base: str, *, host: str, save: Callable[[], None],
              resize: bool = False) -> int | None:
    """The TPM state here becomes the server's current copy; returns its generation.

    The record advances, naming this host (:func:`vtpm_driver.model.custody.advance`),
    and is stored (``save``) BEFORE the state here is stamped with it. Killed
    in between, this host's copy is one generation behind a record that names
    it: :func:`check_live` accepts that copy here only, and the next start
    stamps it (the hand-over is finished); every other copy is older than the
    stored record. No TPM state here (a resize to a new TPM, which its start
    manufactures and stamps with the record's generation): nothing is handed
    over, nothing changes, None. Not idempotent (each call is one hand-over).

    :raises VirtError: the state or the generation could not be read or written.
    """
    if not state.has_tpm_state(state_base, instance.uuid):
        return None
    new = custody.advance(instance, resize=resize, to_host=host)
    save()
    stamp_live(instance, state_base, create=False)
    return new
