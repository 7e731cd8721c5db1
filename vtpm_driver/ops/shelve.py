"""Shelve, unshelve, evacuate and state backups: the TPM outlives its host (issue 15).

The TPM state leaves a host as swtpm wrote it (encrypted with the server's
passphrase) through a :class:`~vtpm_driver.statestore.StateStore`, read from
the host's swtpm directory as seen from here (:class:`Site`); it comes back
by being written into another host's swtpm directory before libvirt defines
and starts the domain there (libvirt then keeps an existing state instead of
manufacturing a new TPM).

* shelve: (owner check in ``user`` mode) stop, store state + record
  (``shelved``), then free the host: domain undefined with its TPM state, its
  libvirt secrets removed. The copy is complete before anything is removed;
  if storing fails the server stays defined (stopped) on its host.
* unshelve / evacuate: passphrase first (:meth:`Guests.prepare_start`), then
  restore the state, define, start. A failure removes what it made on the
  destination; the copy stays.
* backup: a copy of a stopped or running server, not shelved.

Every step is idempotent or refuses with what to do; the service takes the
server's lock around each.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oslo_log import log as logging

from vtpm_driver import exception, policy
from vtpm_driver.ops import secrets as ops_secrets
from vtpm_driver.ops.guests import Guests
from vtpm_driver.statestore import CopyMeta, StateStore
from vtpm_driver.virt import guest, record, state

LOG = logging.getLogger(__name__)


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

    def take_copy(self, site: Site, instance: Any, *, reason: str, running: bool,
                  shelved: bool = False) -> CopyMeta:
        """Store the server's current state and record off-host (replaces its copy).

        :raises VTPMError: the state is missing, not encrypted, or not stored.
        """
        return self.store_state(instance, host=site.name, state_base=site.state_base,
                                record_text=record.record_xml(instance), reason=reason,
                                running=running, shelved=shelved)

    def store_state(self, instance: Any, *, host: str | None, state_base: str,
                    record_text: str, reason: str, running: bool,
                    shelved: bool = False) -> CopyMeta:
        """Store ``state_base/<uuid>`` and ``record_text`` off-host (replaces the copy).

        The one place a copy is made: :meth:`take_copy` here, the Nova shim
        with Nova's domain XML as the record.

        :raises VTPMError: the state is missing, not encrypted, or not stored.
        """
        cfg = policy.vtpm_of(instance)
        source = state.state_dir(state_base, instance.uuid) if cfg is not None else None
        if source is not None and not source.is_dir():
            raise exception.VTPMError(
                f"cannot copy the TPM state of server {policy.server_label(instance)}: "
                f"{source} does not exist on host {host}")
        meta = CopyMeta(
            uuid=instance.uuid, name=instance.name, taken_at=self.now(),
            source_host=host, reason=reason, server_running=running, shelved=shelved,
            tpm_version=cfg.version if cfg else None,
            secret_security=cfg.secret_security if cfg else None,
            project_id=getattr(instance, "project_id", None),
            user_id=getattr(instance, "user_id", None))
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
        if not policy.has_vtpm(instance):
            return None
        dom = site.guests.lookup(instance)
        return self.take_copy(site, instance, reason=reason, running=guest.is_active(dom))

    def mark_started(self, instance_uuid: str) -> None:
        """The server runs again: its copy (if any, not shelved) is no longer current."""
        meta = self.store.get(instance_uuid)
        if meta is not None and not meta.shelved and meta.started_after is None:
            self.store.update(instance_uuid, started_after=self.now())

    def stored_instance(self, instance_uuid: str) -> Any:
        """The server as recorded in its copy. :raises VTPMError: no copy."""
        return record.parse_record_xml(self.store.record(instance_uuid))

    # -- shelve --------------------------------------------------------------------

    def shelve(self, context: Any, site: Site, instance: Any, *, timeout: float = 0
               ) -> CopyMeta:
        """Stop, store off-host, free the host (domain, TPM state, libvirt secrets).

        :raises VTPMSecretForbidden: ``user`` mode, not the owner (nothing touched).
        :raises VTPMError: suspended (resume first), or the copy failed: the
            server is then stopped on its host and nothing was removed.
        """
        cfg = policy.vtpm_of(instance)
        policy.check_may_offload(cfg, instance, context, "shelve")
        dom = site.guests.lookup(instance)
        if guest.has_managed_save(dom):
            raise exception.VTPMError(
                f"cannot shelve server {policy.server_label(instance)} while it is suspended: "
                "resume it first")
        guest.power_off(dom, graceful=timeout > 0, timeout=float(timeout))
        instance.system_metadata.pop(policy.RESCUE_KEY, None)
        meta = self.take_copy(site, instance, reason="shelve", running=False, shelved=True)
        recorded = policy.recorded_secret(instance)
        guest.undefine(dom, keep_tpm=False)
        state.remove_state(site.state_base, instance.uuid)
        ops_secrets.remove_libvirt_secrets(site.guests.secrets, instance, recorded=recorded)
        LOG.info("Shelved server %s from host %s (TPM state off-host, %d bytes)",
                 instance.name, site.name, meta.size, instance_uuid=instance.uuid)
        return meta

    # -- restore on a host (unshelve, evacuate) ----------------------------------------

    def _check_free(self, site: Site, instance: Any) -> None:
        site.guests.check_no_domain(
            instance, f"cannot bring server {policy.server_label(instance)} to host "
            f"{site.name!r}")
        if site.state_dir(instance.uuid).exists():
            raise exception.VTPMError(
                f"cannot bring server {policy.server_label(instance)} to host {site.name!r}: "
                f"TPM state {site.state_dir(instance.uuid)} is there already (see "
                "vtpm-driver audit)")

    def restore(self, context: Any, site: Site, instance: Any, operation: str) -> None:
        """Passphrase, restored state, define, start on ``site``; undone on failure.

        :raises VTPMSecretForbidden, InvalidConfiguration, InstanceExists: nothing touched.
        :raises VTPMError: the start failed; the destination keeps nothing.
        """
        cfg = policy.vtpm_of(instance)
        policy.check_may_offload(cfg, instance, context, operation)
        if cfg is not None:
            site.guests.check_host_offers(cfg, instance)
        self._check_free(site, instance)
        start = site.guests.prepare_start(context, instance, cfg)
        dom = None
        try:
            if cfg is not None and not self.store.restore(instance.uuid,
                                                          site.state_dir(instance.uuid)):
                raise exception.VTPMError("the off-host copy holds no TPM state")
            dom = site.guests.define(instance, cfg)
            site.guests.launch(dom, instance, start)
        except Exception as exc:
            problems = self._undo(site, instance, dom)
            outcome = ("the off-host copy is kept; nothing is left on the host" if not problems
                       else "the off-host copy is kept; remove by hand: " + "; ".join(problems))
            what = f"cannot {operation} server {policy.server_label(instance)} on {site.name}"
            if isinstance(exc, exception.VTPMError):
                raise type(exc)(f"{what}: {exc} ({outcome})") from exc
            raise exception.VTPMError(f"{what}: {exc} ({outcome})") from exc

    @staticmethod
    def _undo(site: Site, instance: Any, dom: Any) -> list[str]:
        problems = []
        try:
            if dom is not None:
                guest.destroy(dom)
                guest.undefine(dom, keep_tpm=False)
            state.remove_state(site.state_base, instance.uuid)
            ops_secrets.remove_libvirt_secrets(site.guests.secrets, instance)
        except exception.VTPMError as exc:
            problems.append(f"{site.name}: {exc}")
        return problems

    def unshelve(self, context: Any, site: Site, instance_uuid: str, *,
                 keep_copy: bool) -> Any:
        """Bring a shelved server back on ``site`` with the same TPM; returns it.

        ``keep_copy``: keep the copy as the server's state backup (``[vtpm]
        state_backup`` is on), else remove it once the server runs.

        :raises VTPMError: not shelved; see :meth:`restore`.
        """
        meta = self.store.get(instance_uuid)
        if meta is None or not meta.shelved:
            raise exception.VTPMError(f"server {instance_uuid} is not shelved")
        instance = self.stored_instance(instance_uuid)
        self.restore(context, site, instance, "unshelve")
        self.restored(instance_uuid, meta, keep_copy=keep_copy)
        LOG.info("Unshelved server %s on host %s", instance.name, site.name,
                 instance_uuid=instance_uuid)
        return instance

    def evacuation_copy(self, instance_uuid: str, *, label: str, host: str | None, mode: str,
                        allow_stale: bool) -> tuple[CopyMeta, str]:
        """The copy an evacuation of the server restores, and how old it is (for the
        output and the log); the standalone :meth:`evacuate` and Nova's shim ask here.

        :raises OperationNotSupportedForVTPM: no copy (names ``[vtpm]
            state_backup``), or a stale one and ``allow_stale`` is False.
        """
        meta = policy.check_copy_exists(self.store.get(instance_uuid), label, host, mode)
        return meta, policy.check_restore(meta, allow_stale=allow_stale, now=self.now(),
                                          label=label)

    def evacuate(self, context: Any, site: Site, instance_uuid: str, *, allow_stale: bool,
                 mode: str, label: str) -> tuple[Any, str]:
        """Rebuild a server whose host is gone from its copy; returns it and the copy's age.

        :raises OperationNotSupportedForVTPM: no copy (names ``[vtpm]
            state_backup``), or a stale one and ``allow_stale`` is False.
        """
        meta, described = self.evacuation_copy(instance_uuid, label=label, host=None,
                                               mode=mode, allow_stale=allow_stale)
        instance = self.stored_instance(instance_uuid)
        instance.system_metadata[policy.EVACUATED_FROM_KEY] = str(meta.source_host)
        instance.system_metadata.pop(policy.RESCUE_KEY, None)
        self.restore(context, site, instance, "evacuate")
        self.store.update(instance_uuid, started_after=self.now())
        log = LOG.info if policy.copy_is_current(meta) else LOG.warning
        log("Evacuated server %s from host %s to %s with the TPM state %s", instance.name,
            meta.source_host, site.name, described, instance_uuid=instance_uuid)
        return instance, described
