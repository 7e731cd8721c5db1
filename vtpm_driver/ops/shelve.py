"""Off-host copies of the TPM state: what lets a TPM outlive its host (issue 15).

The TPM state leaves a host as swtpm wrote it (encrypted with the server's
passphrase) through a :class:`~vtpm_driver.statestore.StateStore`, read from
the host's swtpm directory (:class:`Site`). Nova moves the server: its shelve,
unshelve and evacuation go through the shim (``nova/virt/vtpm/offhost.py``),
which stores the state here with Nova's domain XML as the record
(:meth:`OffHostOps.store_state`), asks which copy an evacuation may restore
(:meth:`OffHostOps.evacuation_copy`) and says what becomes of a copy once the
server runs again (:meth:`OffHostOps.restored`, :meth:`OffHostOps.mark_started`).
The command line keeps copies fresh on its one host (``[vtpm] state_backup``,
``vtpm-driver state backup``: :meth:`OffHostOps.backup`).

Every step is idempotent or refuses with what to do; the caller takes the
server's lock around each.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vtpm_driver import exception
from vtpm_driver.model import custody, rules
from vtpm_driver.model.server import server_label
from vtpm_driver.ops.guests import Guests
from vtpm_driver.statestore import CopyMeta, StateStore
from vtpm_driver.virt import guest, record, state


@dataclasses.dataclass
class Site:
    """One host for these operations: its name, guests and swtpm directory seen from here."""

    name: str | None
    guests: Guests
    state_base: str

    def state_dir(self, instance_uuid: str) -> Path:
        return state.state_dir(self.state_base, instance_uuid)


class OffHostOps:
    """The off-host operations over one :class:`StateStore`."""

    def __init__(self, store: StateStore, now: Callable[[], float] = time.time) -> None:
        self.store = store
        self.now = now

    def __repr__(self) -> str:
        return f"OffHostOps({self.store!r})"

    # -- copies ------------------------------------------------------------------

    def take_copy(self, site: Site, instance: Any, *, reason: str, running: bool) -> CopyMeta:
        """Store the server's current state and record off-host (replaces its copy).

        :raises VTPMError: the state is missing, not encrypted, or not stored.
        """
        return self.store_state(instance, host=site.name, state_base=site.state_base,
                                record_text=record.record_xml(instance), reason=reason,
                                running=running)

    def store_state(self, instance: Any, *, host: str | None, state_base: str,
                    record_text: str, reason: str, running: bool,
                    shelved: bool = False, generation: int | None = None) -> CopyMeta:
        """Store ``state_base/<uuid>`` and ``record_text`` off-host (replaces the copy).

        The one place a copy is made: :meth:`take_copy` here, the Nova shim
        with Nova's domain XML as the record. ``generation``: the copy's
        custody generation (default: the record's current one; a shelve
        passes the one it just advanced to, the copy being the current copy).

        :raises VTPMError: the state is missing, not encrypted, or not stored.
        """
        cfg = rules.vtpm_of(instance)
        source = state.state_dir(state_base, instance.uuid) if cfg is not None else None
        if source is not None and not source.is_dir():
            raise exception.VTPMError(
                f"cannot copy the TPM state of server {server_label(instance)}: "
                f"{source} does not exist on host {host}")
        meta = CopyMeta(
            uuid=instance.uuid, name=instance.name, taken_at=self.now(),
            source_host=host, reason=reason, server_running=running, shelved=shelved,
            tpm_version=cfg.version if cfg else None,
            secret_security=cfg.secret_security if cfg else None,
            project_id=getattr(instance, "project_id", None),
            user_id=getattr(instance, "user_id", None),
            generation=generation if generation is not None else custody.recorded(instance))
        return self.store.put(meta, record_text, source)

    def restored(self, instance_uuid: str, meta: CopyMeta, *, keep_copy: bool) -> None:
        """The server runs again from ``meta``'s copy: what becomes of the copy.

        A shelved copy is removed unless ``keep_copy`` (``[vtpm] state_backup``
        is on), then it stays as the server's backup; any kept copy is marked
        overtaken by this start. Idempotent.
        """
        if meta.shelved and not keep_copy:
            self.store.delete(instance_uuid)
        else:
            self.store.update(instance_uuid, shelved=False, started_after=self.now())

    def backup(self, site: Site, instance: Any, reason: str) -> CopyMeta | None:
        """A copy of a (running or stopped) server with a vTPM; None without one."""
        if not rules.has_vtpm(instance):
            return None
        dom = site.guests.lookup(instance)
        return self.take_copy(site, instance, reason=reason, running=guest.is_active(dom))

    def mark_started(self, instance_uuid: str) -> None:
        """The server runs again: its copy (if any, not shelved) is no longer current."""
        meta = self.store.get(instance_uuid)
        if meta is not None and not meta.shelved and meta.started_after is None:
            self.store.update(instance_uuid, started_after=self.now())

    def copy_name(self, meta: CopyMeta) -> str:
        """How an off-host copy is named in a refusal: the store and where it was taken."""
        return (f"the off-host copy in {getattr(self.store, 'root', self.store)} (taken on host "
                f"{meta.source_host}, {meta.reason})")

    def check_custody(self, instance: Any, meta: CopyMeta, *, allow_stale: bool,
                      doing: str = "restore") -> custody.Verdict:
        """Refuse to restore a copy that is not the server's current one (custody).

        Its generation (``meta.generation``) must equal the record's
        (:func:`vtpm_driver.model.custody.check`); a copy with none, of a server whose
        record has none either, was taken before custody and is current once.
        ``allow_stale`` (``[vtpm] allow_stale_tpm_state``) accepts an older one;
        the caller logs it. Pure but for naming the store.

        :raises StaleTPMState: names the server, the copy, both generations.
        """
        return custody.check(instance, meta.generation, copy=self.copy_name(meta), doing=doing,
                             allow_stale=allow_stale)

    def evacuation_copy(self, instance_uuid: str, *, label: str, host: str | None, mode: str,
                        allow_stale: bool) -> tuple[CopyMeta, str]:
        """The copy an evacuation of the server restores, and how old it is (for the
        output and the log); Nova's evacuation through the shim asks here.

        :raises OperationNotSupportedForVTPM: no copy (names ``[vtpm]
            state_backup``), or a stale one and ``allow_stale`` is False.
        """
        meta = rules.check_copy_exists(self.store.get(instance_uuid), label, host, mode)
        return meta, rules.check_restore(meta, allow_stale=allow_stale, now=self.now(),
                                          label=label)
