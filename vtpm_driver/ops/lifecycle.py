"""Create and delete a server with (or without) a vTPM; undo a failed create (SPEC F1, F3, G3).

Rules kept here:

* Everything that can be checked is checked before anything is created: the
  vTPM request (:mod:`vtpm_driver.model.rules`), the host's traits, the boot files
  and sizes (pure XML building), name/UUID clashes, stale TPM state (A6).
* The passphrase comes first (:func:`vtpm_driver.ops.secrets.prepare_start`,
  creating the Barbican secret), then the domain is defined and started with
  the libvirt secret only around the start (E3).
* A failed spawn undoes everything it created (domain and TPM state, libvirt
  secret, Barbican secret, console log) and raises one error of the original
  type saying what failed and that nothing was left behind (G3).
* Delete asks Barbican first, so a caller who may not delete the secret
  leaves the server untouched; everything after that is local and idempotent.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from oslo_log import log as logging

from vtpm_driver import exception, faults
from vtpm_driver.model import rules
from vtpm_driver.model.request import UNPARSED, Unparsed, VTPMConfig
from vtpm_driver.model.server import recorded_secret, server_label
from vtpm_driver.ops import secrets as ops_secrets
from vtpm_driver.ops.guests import Guests
from vtpm_driver.virt import guest, state

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class _SpawnProgress:
    """What a spawn has created so far, for the undo."""

    start: ops_secrets.StartSecret | None = None
    dom: Any = None
    launched: bool = False


def _wrap(exc: BaseException, what: str, problems: list[str]) -> exception.VTPMError:
    """``exc`` re-raised as the same VTPMError type with what failed and the cleanup outcome."""
    if problems:
        outcome = "cleanup incomplete, remove by hand: " + "; ".join(problems)
    else:
        outcome = "everything it had created was removed"
    if isinstance(exc, exception.VTPMError):
        wrapped = copy.copy(exc)  # its type and its own fields (StaleTPMState's generations)
        wrapped.message = f"{what}: {exc} ({outcome})"
        wrapped.args = (wrapped.message,)
        return wrapped
    return exception.VTPMError(f"{what}: unexpected {type(exc).__name__}: {exc} ({outcome})")


class LifecycleOps:
    """spawn and destroy over one host's :class:`~vtpm_driver.ops.guests.Guests`."""

    def __init__(self, guests: Guests) -> None:
        self.guests = guests

    def __repr__(self) -> str:
        return f"LifecycleOps({self.guests!r})"

    def _refuse_clashes(self, instance: Any, cfg: VTPMConfig | None) -> None:
        """A define with an existing name+UUID would silently replace that domain.

        :raises InstanceExists: a domain has the server's name or UUID.
        :raises VTPMError: swtpm state of a deleted server is in the way.
        """
        conn = self.guests.conn
        label = server_label(instance)
        for key in (instance.uuid, instance.name):
            try:
                dom = guest.lookup(conn, key)
            except exception.InstanceNotFound:
                continue
            raise exception.InstanceExists(
                f"cannot spawn server {label}: domain {dom.name()!r} "
                f"({dom.UUIDString()}) already exists on this host"
            )
        stale = state.state_dir(self.guests.state_base, instance.uuid)
        if cfg is not None and stale.exists():
            raise exception.VTPMError(
                f"cannot spawn server {label}: swtpm state {stale} already exists with no "
                "server; it belongs to a deleted server (see vtpm-driver audit): remove it first"
            )

    def spawn(self, context: Any, instance: Any, image_meta: Any = None,
              power_on: bool = True,
              vtpm: VTPMConfig | Unparsed | None = UNPARSED) -> None:
        """Create the server: Barbican secret, domain with ``<tpm>`` + record, start (F1).

        :raises InvalidVTPMConfig, InvalidConfiguration, InstanceExists, VirtError:
            refused before anything was created.
        :raises VTPMError: (same type as the cause) a later step failed;
            everything this spawn created was removed again (G3).
        """
        if image_meta is not None:
            instance.image_meta = image_meta
        cfg = rules.vtpm_of(instance) if vtpm is UNPARSED else vtpm
        if cfg is not None:
            self.guests.check_host_offers(cfg, instance)
        self.guests.ensure_console_log(instance)
        base = self.guests.base_xml(instance)
        self._refuse_clashes(instance, cfg)

        progress = _SpawnProgress()
        try:
            progress.start = self.guests.prepare_start(context, instance, cfg, create=True,
                                                       absent_ok=True)
            faults.point("spawn.after_barbican")
            self.guests.manufacture(context, instance, cfg, progress.start)
            progress.dom = guest.define(self.guests.conn,
                                        self.guests.domain_xml(instance, cfg, base))
            faults.point("spawn.after_define")
            if power_on:
                progress.launched = True
                self.guests.launch(progress.dom, instance, progress.start)
        except BaseException as exc:
            problems = self._undo_spawn(context, instance, cfg, progress)
            if not isinstance(exc, Exception):
                raise
            LOG.debug("Spawn failed: %s", exc, instance_uuid=instance.uuid)
            raise _wrap(exc, f"cannot spawn server {server_label(instance)}", problems
                        ) from exc
        LOG.info("Spawned server %s%s", instance.name,
                 f" with vTPM {cfg.version}/{cfg.model} ({cfg.secret_security} secret)"
                 if cfg else "", instance_uuid=instance.uuid)

    def _undo_spawn(self, context: Any, instance: Any, cfg: VTPMConfig | None,
                    progress: _SpawnProgress) -> list[str]:
        """Remove what a failed spawn created; returns what could not be removed."""
        problems: list[str] = []
        if progress.dom is not None:
            try:
                guest.remove(progress.dom)
            except exception.VTPMError as exc:
                problems.append(f"domain {instance.uuid}: {exc}")
        if cfg is not None:
            try:
                state.remove_state(self.guests.state_base, instance.uuid)
            except exception.VTPMError as exc:
                problems.append(str(exc))
        start = progress.start
        if progress.launched and start is not None:
            # By usage: only a vtpm secret serving this server is ours to remove
            # (a host-mode one stays defined after a failed start).
            try:
                leftover = self.guests.secrets.find(instance.uuid)
                if leftover is not None:
                    self.guests.secrets.undefine(leftover)
            except exception.VTPMError as exc:
                problems.append(f"libvirt secret of server {instance.uuid}: {exc}")
        if start is not None and start.created:
            try:
                ops_secrets.delete_barbican_secret(context, instance, instance.flavor,
                                                   self.guests.keymgr)
            except exception.VTPMError as exc:
                problems.append(f"Barbican secret {start.secret_uuid}: {exc}")
        if progress.launched:
            self.guests.remove_own_console_log(instance)
        return problems

    def destroy(self, context: Any, instance: Any, destroy_disks: bool = True,
                destroy_secrets: bool = True) -> None:
        """Delete the server (F3); a second call is a no-op.

        The Barbican secret is deleted FIRST, right after the (read-only)
        domain lookup: if the caller may not delete it, nothing is touched
        and the server keeps running. Everything after that needs only this
        host and can be retried. ``destroy_disks=False`` (Nova's hard reboot
        and revert) only powers off and undefines, keeping TPM state and
        secrets; ``destroy_secrets=False`` keeps the Barbican secret.

        :raises VTPMSecretForbidden: the caller may not delete the Barbican secret.
        :raises KeyManagerUnavailable: Barbican is down (nothing was touched).
        """
        recorded = recorded_secret(instance)
        dom = self.guests.find(instance)
        if destroy_disks and destroy_secrets:
            ops_secrets.delete_barbican_secret(context, instance, instance.flavor,
                                               self.guests.keymgr)
            faults.point("delete.after_barbican")
        if dom is not None:
            guest.remove(dom, keep_tpm=not destroy_disks)
            faults.point("delete.after_undefine")
        if not destroy_disks:
            return
        state.remove_state(self.guests.state_base, instance.uuid)
        faults.point("delete.after_state")
        ops_secrets.remove_libvirt_secrets(self.guests.secrets, instance, recorded=recorded)
        self.guests.remove_own_console_log(instance)
        if dom is not None:
            LOG.info("Deleted server %s", instance.name, instance_uuid=instance.uuid)
