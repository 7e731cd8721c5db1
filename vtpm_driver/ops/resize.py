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

What happens to the TPM is :func:`vtpm_driver.policy.resize_change`:
``KEPT`` (the state stays; a copy is backed up first so a revert gets it as it
was), ``FRESH`` (the state directory is removed and swtpm_setup manufactures
a new TPM at the next start, with the same Barbican secret, as in Nova),
``ADDED`` (a secret is created) or ``REMOVED`` (the state goes, the secret is
deleted on confirm). A revert brings back the old flavor, state and secret and
deletes a secret created for an added vTPM. Resizing between ``deployment``
and another mode is refused (:func:`vtpm_driver.policy.check_mode_change`).
"""

from __future__ import annotations

import json
import socket
from typing import Any

from oslo_log import log as logging

from vtpm_driver import exception, faults, policy, spec
from vtpm_driver.ops import secrets as ops_secrets
from vtpm_driver.ops.backup import ResizeBackups
from vtpm_driver.ops.guests import DEFAULT_RETRY_INTERVAL, Guests
from vtpm_driver.policy import Change
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
                f"server {policy.server_label(instance)} has no resize in progress: no old "
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
            f"cannot migrate server {policy.server_label(instance)} to {spec.show(dest)}: the "
            "standalone driver only resizes on this host (cold migration to another host "
            "is not implemented)"
        )

    def _checked_change(self, instance: Any, old_flavor: Any, new_flavor: Any
                        ) -> tuple[spec.VTPMConfig | None, spec.VTPMConfig | None, Change]:
        """Both configs and the change, refused if this host or Nova's rules cannot do it."""
        old_cfg = policy.vtpm_of(instance, flavor=old_flavor)
        new_cfg = policy.vtpm_of(instance, flavor=new_flavor)
        if new_cfg is not None:
            self.guests.check_host_offers(new_cfg, instance)
        policy.check_mode_change(old_cfg, new_cfg, policy.server_label(instance))
        return old_cfg, new_cfg, policy.resize_change(old_cfg, new_cfg)

    # -- the four steps -------------------------------------------------------

    def migrate_disk_and_power_off(self, context: Any, instance: Any, dest: str | None,
                                   flavor: Any, timeout: float = 0,
                                   retry_interval: float = 0) -> str:
        """Check the new flavor, stop the guest, back up its TPM state.

        Everything is checked before the guest is stopped. Returns Nova's
        ``disk_info`` (a JSON list; empty: no disk is copied on the same host).

        :raises InvalidVTPMConfig, InvalidConfiguration, OperationNotSupportedForVTPM:
            the new flavor cannot be honoured here.
        """
        self._check_local(dest, instance)
        old_cfg, _new_cfg, _change = self._checked_change(instance, instance.flavor, flavor)
        dom = self.guests.lookup(instance)
        if self.backups.has_backup(instance.uuid):
            raise exception.VTPMError(
                f"a resize of server {policy.server_label(instance)} is already in progress "
                f"(backup in {str(self.backups.backup_dir(instance.uuid))!r}): confirm or "
                "revert it first"
            )
        if guest.has_managed_save(dom):
            raise exception.VTPMError(
                f"cannot resize server {policy.server_label(instance)} while it is suspended: "
                "resume it first"
            )
        stored = record.record_from_domain(dom) or instance
        guest.power_off(dom, graceful=timeout > 0, timeout=float(timeout),
                        retry_interval=float(retry_interval or DEFAULT_RETRY_INTERVAL))
        faults.point("resize.after_power_off")
        self.backups.make(instance, stored, keep_state=old_cfg is not None)
        faults.point("resize.after_backup")
        LOG.info("Stopped for resize; vTPM state backed up in %s",
                 self.backups.backup_dir(instance.uuid), instance_uuid=instance.uuid)
        return json.dumps([])

    def finish_migration(self, context: Any, instance: Any, image_meta: Any = None,
                         power_on: bool = True) -> None:
        """Redefine the server with the new flavor and start it (F4).

        A secret created here (vTPM added) is deleted again if this step
        fails; the backup stays, so a revert is always possible.
        """
        if image_meta is not None:
            instance.image_meta = image_meta
        _old_cfg, new_cfg, change = self._checked_change(
            instance, self._old_flavor(instance), instance.flavor)
        dom = self.guests.lookup(instance)
        start: ops_secrets.StartSecret | None = None
        try:
            needs_secret = new_cfg is not None and policy.recorded_secret(instance) is None
            if power_on or needs_secret:
                start = self.guests.prepare_start(context, instance, new_cfg, create=True)
            faults.point("finish.after_secret")
            if change.drops_old_state:
                LOG.info("vTPM changed or removed by the resize; starting from a fresh TPM",
                         instance_uuid=instance.uuid)
                state.remove_state(self.guests.state_base, instance.uuid)
            dom = self.guests.define(instance, new_cfg)
            faults.point("finish.after_define")
            if power_on:
                self.guests.launch(dom, instance, start)
        except BaseException:
            if start is not None and start.created:
                self._delete_quietly(context, instance)
            raise
        LOG.info("Resize finished", instance_uuid=instance.uuid)

    def confirm_migration(self, context: Any, instance: Any) -> None:
        """Drop the backup; delete the secret when the vTPM was removed (F4).

        The Barbican delete comes first: if it is refused, nothing changes
        and the confirm can be retried with the right credentials.
        """
        old_flavor = self._old_flavor(instance)
        change = policy.resize_change(policy.vtpm_of(instance, flavor=old_flavor),
                                      policy.vtpm_of(instance))
        secret_uuid = policy.recorded_secret(instance)
        if change is Change.REMOVED and secret_uuid:
            ops_secrets.delete_barbican_secret(context, instance, old_flavor,
                                               self.guests.keymgr)
            faults.point("confirm.after_barbican")
            self.guests.secrets.undefine(secret_uuid)
            dom = self.guests.find(instance)
            if dom is not None:
                self.guests.update_record(dom, instance)
        faults.point("confirm.before_discard")
        self.backups.discard(instance.uuid)
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
        old_flavor = self._old_flavor(instance)
        new_flavor = getattr(instance, "new_flavor", None) or self._recorded_flavor(dom)
        old_cfg = policy.vtpm_of(instance, flavor=old_flavor)
        new_cfg = policy.vtpm_of(instance, flavor=new_flavor) if new_flavor else None
        change = policy.resize_change(old_cfg, new_cfg)
        secret_uuid = policy.recorded_secret(instance)
        if change is Change.ADDED and secret_uuid:
            ops_secrets.delete_barbican_secret(context, instance, new_flavor,
                                               self.guests.keymgr)
            self.guests.secrets.undefine(secret_uuid)
        instance.flavor = old_flavor
        start = self.guests.prepare_start(context, instance, old_cfg) if power_on else None
        faults.point("revert.after_secret_fetch")
        guest.destroy(dom)
        guest.discard_managed_save(dom)
        restored = old_cfg is not None and self.backups.restore_state(instance)
        faults.point("revert.after_restore")
        if not restored and change not in (Change.NONE, Change.KEPT):
            # No saved state to go back to: whatever is there belongs to the new TPM.
            state.remove_state(self.guests.state_base, instance.uuid)
        dom = self.guests.define(instance, old_cfg)
        faults.point("revert.after_define")
        if power_on:
            self.guests.launch(dom, instance, start)
        faults.point("revert.before_discard")
        self.backups.discard(instance.uuid)
        LOG.info("Resize reverted", instance_uuid=instance.uuid)

    def _delete_quietly(self, context: Any, instance: Any) -> None:
        try:
            ops_secrets.delete_barbican_secret(context, instance, instance.flavor,
                                               self.guests.keymgr)
        except exception.VTPMError as exc:
            LOG.error("Could not delete the vTPM secret created by a failed resize, delete "
                      "it by hand: %s", exc, instance_uuid=instance.uuid)
