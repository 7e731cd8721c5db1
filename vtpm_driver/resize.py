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
step stashes the old server record next to the TPM state backup, and later
steps fall back to it (old flavor) and to the domain's record (new flavor).

What happens to the TPM (Nova's rules):

* same version and model: the state is kept (a copy is backed up first so a
  revert gets the state as it was before the resize);
* version or model changed: a fresh TPM (the state directory is removed;
  libvirt's swtpm_setup manufactures a new one at the next start). The
  Barbican secret stays the same, as in Nova: it only encrypts the state;
* vTPM added: a secret is created; removed: the state goes away, the secret
  is deleted on confirm;
* revert: old flavor, old state (from the backup), old secret; a secret
  created for an added vTPM is deleted;
* resizing between ``deployment`` and another secret mode is refused (Nova
  refuses it: the secret's owner would have to change).

Backups live in ``<backup_root>/<uuid>/`` (default ``/var/lib/vtpm-driver/resize``,
root-only 0700): ``swtpm/`` is a copy of ``<swtpm_state_dir>/<uuid>`` keeping
owner, group and modes, ``record.xml`` the old server record (UUIDs only,
never a passphrase). They are outside libvirt's swtpm directory on purpose, so
``vtpm-driver audit`` never mistakes them for orphaned TPM state; confirm,
revert and delete remove them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from oslo_log import log as logging

from vtpm_driver import exception, objects, servers, spec
from vtpm_driver.virt import domain, guest, secret, state
from vtpm_driver.virt._validate import canonical_uuid
from vtpm_driver.vtpm_ops import (
    DEFAULT_RETRY_INTERVAL,
    SYSMETA_KEY,
    StartSecret,
    VTPMOps,
    same_tpm,
    server_label,
    vtpm_config_of,
)

LOG = logging.getLogger(__name__)

DEFAULT_BACKUP_ROOT = "/var/lib/vtpm-driver/resize"
STATE_BACKUP = "swtpm"
RECORD_STASH = "record.xml"
_LOCAL_DESTS = frozenset({"", "localhost", "127.0.0.1", "::1"})


def copy_tree_preserving(src: Path, dst: Path) -> None:
    """Copy a directory keeping modes, times, owners and groups (swtpm's files
    belong to the swtpm user; a plain copy would make them root's)."""
    shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
    for src_dir, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(src_dir, src)
        for name in [".", *dirnames, *filenames]:
            source = Path(src_dir, name)
            target = Path(dst, rel, name)
            st = source.lstat()
            os.lchown(target, st.st_uid, st.st_gid)
    shutil.copystat(src, dst)


def _check_modes(old: spec.VTPMConfig | None, new: spec.VTPMConfig | None,
                 instance: Any) -> None:
    """Nova refuses resizes that would change who owns the Barbican secret."""
    if old is None or new is None or old.secret_security == new.secret_security:
        return
    if spec.SECRET_DEPLOYMENT in (old.secret_security, new.secret_security):
        raise exception.OperationNotSupportedForVTPM(
            f"operation 'resize' is not supported for vTPM-enabled server "
            f"{server_label(instance)} from secret security {old.secret_security!r} to "
            f"{new.secret_security!r}: the Barbican secret would have to change owner "
            "between the user and the service user (Nova refuses it as well)"
        )


class ResizeOps:
    """The resize steps over :class:`~vtpm_driver.vtpm_ops.VTPMOps`."""

    def __init__(self, ops: VTPMOps, backup_root: str | os.PathLike[str] = DEFAULT_BACKUP_ROOT
                 ) -> None:
        self.ops = ops
        self.backup_root = Path(backup_root)

    def __repr__(self) -> str:
        return f"ResizeOps(backup_root={str(self.backup_root)!r})"

    # -- backups ------------------------------------------------------------

    def backup_dir(self, instance_uuid: str) -> Path:
        return self.backup_root / canonical_uuid(instance_uuid, "instance uuid")

    def has_backup(self, instance_uuid: str) -> bool:
        return self.backup_dir(instance_uuid).exists()

    def discard_backup(self, instance_uuid: str) -> bool:
        """Remove a resize backup; True if there was one."""
        path = self.backup_dir(instance_uuid)
        if not path.exists():
            return False
        try:
            shutil.rmtree(path)
        except OSError as exc:
            raise exception.VTPMError(
                f"cannot remove resize backup {str(path)!r}: {exc.strerror}"
            ) from None
        LOG.debug("Removed resize backup %s", path, instance_uuid=instance_uuid)
        return True

    def _make_backup(self, instance: Any, record: domain.ServerRecord,
                     keep_state: bool) -> None:
        path = self.backup_dir(instance.uuid)
        live = state.state_dir(self.ops.state_base, instance.uuid)
        try:
            os.makedirs(self.backup_root, mode=0o700, exist_ok=True)
            os.mkdir(path, 0o700)
            (path / RECORD_STASH).write_text(domain.record_xml(record))
            if keep_state and live.exists():
                copy_tree_preserving(live, path / STATE_BACKUP)
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise exception.VTPMError(
                f"cannot back up the vTPM state of server {server_label(instance)} to "
                f"{str(path)!r}: {exc.strerror or exc}"
            ) from None

    def _stashed_record(self, instance_uuid: str) -> domain.ServerRecord | None:
        path = self.backup_dir(instance_uuid) / RECORD_STASH
        try:
            return domain.parse_record_xml(path.read_text())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise exception.VTPMError(f"cannot read {str(path)!r}: {exc.strerror}") from None

    def _restore_state(self, instance: Any) -> bool:
        """Put the backed-up state back in place; False if there is none."""
        backup = self.backup_dir(instance.uuid) / STATE_BACKUP
        if not backup.exists():
            return False
        state.remove_state(self.ops.state_base, instance.uuid)
        live = state.state_dir(self.ops.state_base, instance.uuid)
        try:
            os.makedirs(live.parent, mode=0o711, exist_ok=True)
            copy_tree_preserving(backup, live)
        except OSError as exc:
            raise exception.VTPMError(
                f"cannot restore the vTPM state of server {server_label(instance)} from "
                f"{str(backup)!r}: {exc.strerror or exc}"
            ) from None
        return True

    # -- flavors --------------------------------------------------------------

    def _old_flavor(self, instance: Any) -> Any:
        old = getattr(instance, "old_flavor", None)
        if old is not None:
            return old
        record = self._stashed_record(instance.uuid)
        if record is None:
            raise exception.VTPMError(
                f"server {server_label(instance)} has no resize in progress: no old flavor "
                f"and no backup in {str(self.backup_dir(instance.uuid))!r}"
            )
        return servers.from_record(record).flavor

    def _recorded_flavor(self, dom: Any) -> objects.Flavor | None:
        record = domain.record_from_domain(dom)
        return servers.from_record(record).flavor if record is not None else None

    @staticmethod
    def _check_local(dest: str | None, instance: Any) -> None:
        if dest is None or dest in _LOCAL_DESTS or dest == socket.gethostname():
            return
        raise exception.VTPMError(
            f"cannot migrate server {server_label(instance)} to {spec.show(dest)}: the "
            "standalone driver only resizes on this host (cold migration to another host "
            "is not implemented)"
        )

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
        old_cfg = vtpm_config_of(instance)
        new_cfg = vtpm_config_of(instance, flavor=flavor)
        if new_cfg is not None:
            self.ops.check_host_offers(new_cfg, instance)
        _check_modes(old_cfg, new_cfg, instance)
        dom = self.ops.lookup(instance)
        if self.has_backup(instance.uuid):
            raise exception.VTPMError(
                f"a resize of server {server_label(instance)} is already in progress (backup "
                f"in {str(self.backup_dir(instance.uuid))!r}): confirm or revert it first"
            )
        if self.ops.has_managed_save(dom):
            raise exception.VTPMError(
                f"cannot resize server {server_label(instance)} while it is suspended: "
                "resume it first"
            )
        record = domain.record_from_domain(dom) or servers.to_record(instance)
        guest.power_off(dom, graceful=timeout > 0, timeout=float(timeout),
                        retry_interval=float(retry_interval or DEFAULT_RETRY_INTERVAL))
        self._make_backup(instance, record, keep_state=old_cfg is not None)
        LOG.info("Stopped for resize; vTPM state backed up in %s",
                 self.backup_dir(instance.uuid), instance_uuid=instance.uuid)
        return json.dumps([])

    def finish_migration(self, context: Any, instance: Any, image_meta: Any = None,
                         power_on: bool = True) -> None:
        """Redefine the server with the new flavor and start it (F4).

        A secret created here (vTPM added) is deleted again if this step
        fails; the backup stays, so a revert is always possible.
        """
        if image_meta is not None:
            instance.image_meta = image_meta
        old_cfg = vtpm_config_of(instance, flavor=self._old_flavor(instance))
        new_cfg = vtpm_config_of(instance)
        if new_cfg is not None:
            self.ops.check_host_offers(new_cfg, instance)
        _check_modes(old_cfg, new_cfg, instance)
        dom = self.ops.lookup(instance)
        created = False
        try:
            start: StartSecret | None = None
            if new_cfg is not None and not instance.system_metadata.get(SYSMETA_KEY):
                secret_uuid, passphrase = self.ops.keymgr.create_vtpm_secret(
                    context, instance, new_cfg.secret_security)
                created = True
                start = StartSecret(secret_uuid, passphrase,
                                    new_cfg.secret_security == spec.SECRET_HOST)
            elif power_on:
                start = self.ops.prepare_start(context, instance, new_cfg)
            if old_cfg is not None and not same_tpm(old_cfg, new_cfg):
                LOG.info("vTPM changed or removed by the resize; starting from a fresh TPM",
                         instance_uuid=instance.uuid)
                state.remove_state(self.ops.state_base, instance.uuid)
            dom = guest.define(self.ops.conn, self.ops.domain_xml(instance, new_cfg))
            if power_on:
                self.ops.launch(dom, instance, start)
        except BaseException:
            if created:
                self._delete_quietly(context, instance, new_cfg)
            raise
        LOG.info("Resize finished", instance_uuid=instance.uuid)

    def confirm_migration(self, context: Any, instance: Any) -> None:
        """Drop the backup; delete the secret when the vTPM was removed (F4).

        The Barbican delete comes first: if it is refused, nothing changes
        and the confirm can be retried with the right credentials.
        """
        old_cfg = vtpm_config_of(instance, flavor=self._old_flavor(instance))
        new_cfg = vtpm_config_of(instance)
        secret_uuid = instance.system_metadata.get(SYSMETA_KEY)
        if old_cfg is not None and new_cfg is None and secret_uuid:
            self.ops.keymgr.delete_vtpm_secret(context, instance, old_cfg.secret_security)
            secret.undefine_vtpm_secret(self.ops.conn, secret_uuid)
            dom = self.ops.find(instance)
            if dom is not None:
                self.ops.update_record(dom, instance)
        self.discard_backup(instance.uuid)
        LOG.info("Resize confirmed", instance_uuid=instance.uuid)

    def finish_revert_migration(self, context: Any, instance: Any,
                                power_on: bool = True) -> None:
        """Back to the old flavor, the old TPM state and the old secret (F4).

        Order: Barbican first (delete a secret created for an added vTPM,
        or read the passphrase for the start), then the guest is stopped,
        the state restored from the backup, the domain redefined and started.
        The backup is removed only once all of that worked.
        """
        dom = self.ops.lookup(instance)
        old_flavor = self._old_flavor(instance)
        new_flavor = getattr(instance, "new_flavor", None) or self._recorded_flavor(dom)
        old_cfg = vtpm_config_of(instance, flavor=old_flavor)
        new_cfg = vtpm_config_of(instance, flavor=new_flavor) if new_flavor else None
        secret_uuid = instance.system_metadata.get(SYSMETA_KEY)
        if old_cfg is None and new_cfg is not None and secret_uuid:
            self.ops.keymgr.delete_vtpm_secret(context, instance, new_cfg.secret_security)
            secret.undefine_vtpm_secret(self.ops.conn, secret_uuid)
        instance.flavor = old_flavor
        start = self.ops.prepare_start(context, instance, old_cfg) if power_on else None
        guest.destroy(dom)
        self.ops.discard_managed_save(dom)
        restored = old_cfg is not None and self._restore_state(instance)
        if not restored and not same_tpm(old_cfg, new_cfg):
            # No saved state to go back to: whatever is there belongs to the new TPM.
            state.remove_state(self.ops.state_base, instance.uuid)
        dom = guest.define(self.ops.conn, self.ops.domain_xml(instance, old_cfg))
        if power_on:
            self.ops.launch(dom, instance, start)
        self.discard_backup(instance.uuid)
        LOG.info("Resize reverted", instance_uuid=instance.uuid)

    def _delete_quietly(self, context: Any, instance: Any,
                        cfg: spec.VTPMConfig | None) -> None:
        try:
            self.ops.keymgr.delete_vtpm_secret(
                context, instance, cfg.secret_security if cfg else None)
        except exception.VTPMError as exc:
            LOG.error("Could not delete the vTPM secret created by a failed resize, delete "
                      "it by hand: %s", exc, instance_uuid=instance.uuid)
