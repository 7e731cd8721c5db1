"""Resize on this host with a vTPM (SPEC F4), Nova's four steps.

Who holds which flavor (as in Nova's compute manager):

* ``migrate_disk_and_power_off``: ``instance.flavor`` is the old flavor, the
  new one comes as the ``flavor`` argument.
* ``finish_migration``: ``instance.flavor`` is the new flavor,
  ``instance.old_flavor`` the old one.
* ``confirm_migration``: ``instance.flavor`` new, ``instance.old_flavor`` old.
* ``finish_revert_migration``: ``instance.flavor`` is the old flavor again,
  ``instance.new_flavor`` the one being abandoned.

A standalone caller may not carry ``old_flavor``/``new_flavor``: the first
step stashes the old server record next to the TPM state backup
(:class:`~vtpm_driver.ops.backup.ResizeBackups`), and later steps fall back to
it (old flavor) and to the domain's record (new flavor).

What happens to the TPM is :func:`vtpm_driver.model.rules.resize_change`:
``KEPT`` (the state stays; a copy is backed up first so a revert gets it as it
was), ``FRESH`` (the state directory is removed and swtpm_setup manufactures
a new TPM at the next start, with the same Barbican secret, as in Nova),
``ADDED`` (a secret is created) or ``REMOVED`` (the state goes, the secret is
deleted on confirm). A revert brings back the old flavor, state and secret and
deletes a secret created for an added vTPM. Resizing between ``deployment``
and another mode is refused (:func:`vtpm_driver.model.rules.check_mode_change`).

Never lose a TPM (issue 13):

* Everything a later step will need from Barbican is asked for before the
  guest is touched: the passphrase is read (a caller who may not read it
  leaves the server running and unchanged), and a vTPM added by a caller
  from another project is refused (its secret would be created in the
  caller's project, where the owner could not delete it).
* Each step journals what it is about to do (:mod:`vtpm_driver.ops.journal`)
  in the server record first; an interrupted step is finished or rolled back
  by the next operation on the server.
* Custody (:mod:`vtpm_driver.model.custody`): ``finish_migration`` hands the TPM
  over (the record's generation advances, the pre-resize one is kept for a
  revert); a revert copies the backup back only if it has exactly that
  pre-resize generation, then advances again, so the resized state can never
  be started.
* A failed ``finish_migration`` rolls the resize back (old flavor, old TPM
  state, the secret it created deleted and no longer recorded), so no
  record ever names a deleted secret.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from oslo_log import log as logging

from vtpm_driver import exception, faults
from vtpm_driver.model import custody, request, rules
from vtpm_driver.model.rules import Change
from vtpm_driver.model.server import recorded_secret, server_label
from vtpm_driver.ops import journal
from vtpm_driver.ops import secrets as ops_secrets
from vtpm_driver.ops.backup import ResizeBackups
from vtpm_driver.ops.guests import DEFAULT_RETRY_INTERVAL, Guests
from vtpm_driver.virt import guest, record, state

LOG = logging.getLogger(__name__)

_LOCAL_DESTS = frozenset({"", "localhost", "127.0.0.1", "::1"})


class ResizeOps:
    """The resize steps over :class:`Guests`, with :class:`ResizeBackups`."""

    def __init__(self, guests: Guests, backups: ResizeBackups) -> None:
        self.guests = guests
        self.backups = backups

    def __repr__(self) -> str:
        return f"ResizeOps({self.backups!r})"

    def has_backup(self, instance_uuid: str) -> bool:
        """True while a resize of the server awaits confirm or revert."""
        return self.backups.has_backup(instance_uuid)

    def discard_backup(self, instance_uuid: str) -> bool:
        """Remove the server's resize backup (delete does); idempotent."""
        return self.backups.discard(instance_uuid)

    # -- flavors --------------------------------------------------------------

    def _old_flavor(self, instance: Any) -> Any:
        old = getattr(instance, "old_flavor", None)
        if old is not None:
            return old
        stashed = self.backups.stashed(instance.uuid)
        if stashed is None:
            raise exception.VTPMError(
                f"server {server_label(instance)} has no resize in progress: no old "
                f"flavor and no backup in {str(self.backups.backup_dir(instance.uuid))!r}"
            )
        return stashed.flavor

    @staticmethod
    def _recorded_flavor(dom: Any) -> Any:
        stored = record.record_from_domain(dom)
        return stored.flavor if stored is not None else None

    @staticmethod
    def _check_local(dest: str | None, instance: Any) -> None:
        if dest is None or dest in _LOCAL_DESTS or dest == socket.gethostname():
            return
        raise exception.VTPMError(
            f"cannot migrate server {server_label(instance)} to {request.show(dest)}: the "
            "standalone driver only resizes on this host (cold migration to another host "
            "is not implemented)"
        )

    def _checked_change(self, instance: Any, old_flavor: Any, new_flavor: Any
                        ) -> tuple[request.VTPMConfig | None, request.VTPMConfig | None, Change]:
        """Both configs and the change, refused if this host or Nova's rules cannot do it."""
        old_cfg = rules.vtpm_of(instance, flavor=old_flavor)
        new_cfg = rules.vtpm_of(instance, flavor=new_flavor)
        if new_cfg is not None:
            self.guests.check_host_offers(new_cfg, instance)
        rules.check_mode_change(old_cfg, new_cfg, server_label(instance))
        return old_cfg, new_cfg, rules.resize_change(old_cfg, new_cfg)

    def _check_barbican_first(self, context: Any, instance: Any,
                              new_cfg: request.VTPMConfig | None, change: Change) -> None:
        """Ask Barbican now for what the resized server's start will need (issue 13 item 3).

        Reads the passphrase (and forgets it) when the resized server keeps
        its secret; refuses a vTPM added from another project (item 8).

        :raises VTPMSecretForbidden, VTPMSecretNotFound, KeyManagerUnavailable:
            the start would fail: nothing was touched.
        """
        check_creator(context, instance, new_cfg, change)
        if new_cfg is None or change is Change.ADDED:
            return
        if recorded_secret(instance) is not None:
            self.guests.prepare_start(context, instance, new_cfg)

    # -- the four steps -------------------------------------------------------

    def migrate_disk_and_power_off(self, context: Any, instance: Any, dest: str | None,
                                   flavor: Any, timeout: float = 0,
                                   retry_interval: float = 0) -> str:
        """Check the new flavor, stop the guest, back up its TPM state.

        Everything is checked before the guest is stopped, Barbican included
        (:meth:`_check_barbican_first`). Returns Nova's ``disk_info`` (a JSON
        list; empty: no disk is copied on the same host).

        :raises InvalidVTPMConfig, InvalidConfiguration, OperationNotSupportedForVTPM:
            the new flavor cannot be honoured here.
        :raises VTPMSecretForbidden: the caller may not read the passphrase the
            resized server needs, or would create its secret in another project.
        """
        self._check_local(dest, instance)
        old_cfg, new_cfg, change = self._checked_change(instance, instance.flavor, flavor)
        dom = self.guests.lookup(instance)
        if self.backups.has_backup(instance.uuid):
            raise exception.VTPMError(
                f"a resize of server {server_label(instance)} is already in progress "
                f"(backup in {str(self.backups.backup_dir(instance.uuid))!r}): confirm or "
                "revert it first"
            )
        if guest.has_managed_save(dom):
            raise exception.VTPMError(
                f"cannot resize server {server_label(instance)} while it is suspended: "
                "resume it first"
            )
        self._check_barbican_first(context, instance, new_cfg, change)
        stored = record.record_from_domain(dom) or instance
        tmp = self.backups.tmp_path(instance.uuid)
        self.guests.journal(dom, instance, journal.begin(journal.RESIZE_PREPARE,
                                                         tmp_backup=str(tmp)))
        guest.power_off(dom, graceful=timeout > 0, timeout=float(timeout),
                        retry_interval=float(retry_interval or DEFAULT_RETRY_INTERVAL))
        faults.point("resize.after_power_off")
        try:
            self.backups.make(instance, stored, keep_state=old_cfg is not None, tmp=tmp)
        finally:  # made, or nothing left of it (make removes its own tmp)
            self.guests.journal(dom, instance, None)
        faults.point("resize.after_backup")
        LOG.info("Stopped for resize; vTPM state backed up in %s",
                 self.backups.backup_dir(instance.uuid), instance_uuid=instance.uuid)
        return json.dumps([])

    def finish_migration(self, context: Any, instance: Any, image_meta: Any = None,
                         power_on: bool = True) -> None:
        """Redefine the server with the new flavor and start it (F4).

        Barbican first (create or read), journalled. If this step fails, a
        secret created here (vTPM added) is deleted and no longer recorded,
        and the resize is rolled back (:meth:`finish_revert_migration` without
        a start): the server is stopped with its old flavor and TPM state and
        no record names a deleted secret (issue 13 item 2). The journal's step
        :data:`~vtpm_driver.ops.journal.STARTING` is written before the start:
        an interruption from there on is finished forward by the next
        operation (the guest may have run on the new state), not rolled back.

        :raises VTPMSecretForbidden: a vTPM added by a caller of another project.
        :raises VTPMError: (same type as the cause) a step failed; the message
            says whether the rollback worked.
        """
        if image_meta is not None:
            instance.image_meta = image_meta
        old_flavor = self._old_flavor(instance)
        _old_cfg, new_cfg, change = self._checked_change(instance, old_flavor, instance.flavor)
        check_creator(context, instance, new_cfg, change)
        dom = self.guests.lookup(instance)
        intent = journal.begin(journal.RESIZE_FINISH)
        self.guests.journal(dom, instance, intent)
        start: ops_secrets.StartSecret | None = None
        try:
            needs_secret = new_cfg is not None and recorded_secret(instance) is None
            if power_on or needs_secret:
                start = self.guests.prepare_start(context, instance, new_cfg, create=True,
                                                  absent_ok=change.makes_new_tpm)
            faults.point("finish.after_secret")
            if start is not None and start.created:
                # Recorded at once: a revert (or the next operation) deletes it.
                intent = intent.with_step("secret created", new_secret=start.secret_uuid)
                self.guests.journal(dom, instance, intent)
            if change.drops_old_state:
                LOG.info("vTPM changed or removed by the resize; starting from a fresh TPM",
                         instance_uuid=instance.uuid)
                state.remove_state(self.guests.state_base, instance.uuid)
                # libvirt makes the fresh TPM: the old one's certificate no longer applies
                # (a revert brings back the old record and its fingerprint; the key
                # manager's copy stays withdrawn).
                self.guests.retire_ek_certificate(context, instance, new_cfg)
            if change is not Change.NONE:  # custody: the resized TPM is the current copy
                custody.advance(instance, resize=True)
            dom = self.guests.define(instance, new_cfg)
            if new_cfg is not None:
                self.guests.stamp(instance, dom)
            faults.point("finish.after_define")
            if power_on:
                # From here the guest may run on the state: an interruption is
                # finished forward, never rolled back (journal.decide).
                self.guests.journal(dom, instance, intent.with_step(journal.STARTING))
                self.guests.launch(dom, instance, start)
        except Exception as exc:
            outcome = self._roll_back_finish(context, instance, old_flavor, start)
            raise _with_outcome(exc, f"cannot finish the resize of server "
                                f"{server_label(instance)}", outcome) from exc
        self.guests.journal(dom, instance, None)
        LOG.info("Resize finished", instance_uuid=instance.uuid)

    def _roll_back_finish(self, context: Any, instance: Any, old_flavor: Any,
                          start: ops_secrets.StartSecret | None) -> str:
        """Undo a failed ``finish_migration``: the secret it created, then a revert
        without a start. Returns what happened, for the error message."""
        new_flavor = instance.flavor
        if start is not None and start.created:
            self._delete_quietly(context, instance)
            try:
                ops_secrets.remove_libvirt_secrets(self.guests.secrets, instance,
                                                   recorded=start.secret_uuid)
            except exception.VTPMError as exc:
                LOG.error("Could not undefine the libvirt secret of a failed resize: %s", exc,
                          instance_uuid=instance.uuid)
        instance.new_flavor = new_flavor
        instance.flavor = old_flavor
        try:
            self.finish_revert_migration(context, instance, power_on=False)
        except exception.VTPMError as exc:
            LOG.error("Could not roll back the failed resize: %s", exc,
                      instance_uuid=instance.uuid)
            return (f"rolling it back failed too ({exc}); the next operation on the server "
                    "retries the rollback")
        return "the resize was rolled back: the server has its old flavor and TPM, stopped"

    def confirm_migration(self, context: Any, instance: Any) -> None:
        """Drop the backup; delete the secret when the vTPM was removed (F4).

        The Barbican delete comes first: if it is refused, nothing changes
        and the confirm can be retried with the right credentials.
        """
        old_flavor = self._old_flavor(instance)
        change = rules.resize_change(rules.vtpm_of(instance, flavor=old_flavor),
                                      rules.vtpm_of(instance))
        secret_uuid = recorded_secret(instance)
        dom = self.guests.find(instance)
        self.guests.journal(dom, instance, journal.begin(journal.RESIZE_CONFIRM))
        if change is Change.REMOVED and secret_uuid:
            ops_secrets.delete_barbican_secret(context, instance, old_flavor,
                                               self.guests.keymgr)
            faults.point("confirm.after_barbican")
            self.guests.secrets.undefine(secret_uuid)
        custody.forget_resize(instance)
        if dom is not None:
            self.guests.update_record(dom, instance)
        faults.point("confirm.before_discard")
        self.backups.discard(instance.uuid)
        self.guests.journal(dom, instance, None)
        LOG.info("Resize confirmed", instance_uuid=instance.uuid)

    def finish_revert_migration(self, context: Any, instance: Any,
                                power_on: bool = True) -> None:
        """Back to the old flavor, the old TPM state and the old secret (F4).

        Order: Barbican first (delete a secret created for an added vTPM,
        or read the passphrase for the start), then the guest is stopped,
        the state restored from the backup, the domain redefined and started.
        The backup is removed only once all of that worked.
        """
        dom = self.guests.lookup(instance)
        entry = journal.read(instance.system_metadata, server_label(instance))
        if entry is not None and (entry.operation, entry.step) == (journal.RESIZE_REVERT,
                                                                   journal.RESTORED):
            self._finish_restored_revert(context, instance, dom, power_on)
            return
        old_flavor = self._old_flavor(instance)
        new_flavor = getattr(instance, "new_flavor", None) or self._recorded_flavor(dom)
        old_cfg = rules.vtpm_of(instance, flavor=old_flavor)
        new_cfg = rules.vtpm_of(instance, flavor=new_flavor) if new_flavor else None
        change = rules.resize_change(old_cfg, new_cfg)
        secret_uuid = recorded_secret(instance)
        # The passphrase first (read only; an added vTPM's old config has none) ...
        # (A resize that dropped the state here: the backup, checked next, brings it back.)
        start = (self.guests.prepare_start(context, instance, old_cfg,
                                           absent_ok=change.drops_old_state)
                 if power_on else None)
        if old_cfg is not None:
            self._check_backup_custody(instance)
        # ... then every change, journalled.
        intent = journal.begin(journal.RESIZE_REVERT)
        self.guests.journal(dom, instance, intent)
        if change is Change.ADDED and secret_uuid:
            ops_secrets.delete_barbican_secret(context, instance, new_flavor,
                                               self.guests.keymgr)
            self.guests.secrets.undefine(secret_uuid)
        instance.flavor = old_flavor
        faults.point("revert.after_secret_fetch")
        guest.destroy(dom)
        guest.discard_managed_save(dom)
        restored = old_cfg is not None and self.backups.restore_state(instance)
        faults.point("revert.after_restore")
        if not restored and change not in (Change.NONE, Change.KEPT):
            # No saved state to go back to: whatever is there belongs to the new TPM.
            state.remove_state(self.guests.state_base, instance.uuid)
        if change is not Change.NONE:
            # custody: the restored TPM is current, the resized one never starts again.
            custody.advance(instance)
            custody.forget_resize(instance)
        # Stored with the redefined domain: a revert run again finishes from here.
        journal.write(instance.system_metadata, intent.with_step(journal.RESTORED))
        dom = self.guests.define(instance, old_cfg)
        if old_cfg is not None:
            self.guests.stamp(instance, dom)
        faults.point("revert.after_define")
        if power_on:
            self.guests.launch(dom, instance, start)
        faults.point("revert.before_discard")
        self.backups.discard(instance.uuid)
        self.guests.journal(dom, instance, None)
        LOG.info("Resize reverted", instance_uuid=instance.uuid)

    def _finish_restored_revert(self, context: Any, instance: Any, dom: Any,
                                power_on: bool) -> None:
        """The rest of a revert interrupted once the domain was redefined (step RESTORED).

        The backup was copied back and the TPM handed over before that define:
        the live state is the current copy, and the backup is now older than
        the record. Only the start (``power_on``) and the discard of the backup
        remain. Idempotent.
        """
        if power_on:
            cfg = rules.vtpm_of(instance)
            start = self.guests.prepare_start(context, instance, cfg)
            if not guest.is_active(dom):
                self.guests.launch(dom, instance, start)
        self.backups.discard(instance.uuid)
        self.guests.journal(dom, instance, None)
        LOG.info("Resize reverted (finished an interrupted revert)",
                 instance_uuid=instance.uuid)

    def _check_backup_custody(self, instance: Any) -> None:
        """Refuse to copy back a resize backup that is not the pre-resize TPM.

        Its generation must equal the one the record had before the resize
        handed the TPM over (:func:`vtpm_driver.model.custody.pre_resize`). Read-only,
        before the guest is touched; no backup state: nothing to check.

        :raises StaleTPMState: names the server, the backup, both generations.
        """
        if not self.backups.has_state(instance.uuid):
            return
        custody.check(instance, self.backups.generation(instance.uuid),
                      copy=f"the resize backup {self.backups.backup_dir(instance.uuid)}",
                      doing="copy back", record=custody.pre_resize(instance),
                      allow_stale=bool(self.guests.conf.vtpm.allow_stale_tpm_state))

    def _delete_quietly(self, context: Any, instance: Any) -> None:
        try:
            ops_secrets.delete_barbican_secret(context, instance, instance.flavor,
                                               self.guests.keymgr)
        except exception.VTPMError as exc:
            LOG.error("Could not delete the vTPM secret created by a failed resize, delete "
                      "it by hand: %s", exc, instance_uuid=instance.uuid)


def check_creator(context: Any, instance: Any, cfg: request.VTPMConfig | None,
                  change: Change) -> None:
    """Refuse a vTPM added by a caller of another project (issue 13 item 8). Pure.

    ``user``/``host`` secrets are created with the caller's token, so in the
    caller's project: an admin of another project would leave a secret the
    owner's project cannot delete. ``deployment`` secrets belong to the
    service user whoever asks.

    :raises VTPMSecretForbidden: naming both projects.
    """
    if (change is not Change.ADDED or cfg is None
            or rules.owned_by_service_user(cfg.secret_security)):
        return
    caller = getattr(context, "project_id", None)
    if caller is None or caller == getattr(instance, "project_id", None):
        return
    raise exception.VTPMSecretForbidden(
        f"cannot add a vTPM to server {server_label(instance)} as a member of project "
        f"{caller}: its {cfg.secret_security!r} secret would be created in that project, "
        f"where the owner's project {instance.project_id} could not delete it; a member of "
        f"{instance.project_id} must do this resize"
    )


def _with_outcome(exc: Exception, what: str, outcome: str) -> exception.VTPMError:
    """``exc`` as the same VTPMError type, saying what failed and how it ended."""
    if isinstance(exc, exception.VTPMError):
        return type(exc)(f"{what}: {exc} ({outcome})")
    return exception.VTPMError(f"{what}: unexpected {type(exc).__name__}: {exc} ({outcome})")
