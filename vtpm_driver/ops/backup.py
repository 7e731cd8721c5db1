"""Resize backups of a server's TPM state and record, so a revert gets them back (SPEC F4).

Backups live in ``<backup_root>/<uuid>/`` (default ``/var/lib/vtpm-driver/resize``,
root-only 0700): ``swtpm/`` is a copy of ``<swtpm_state_dir>/<uuid>`` keeping
owner, group and modes, ``record.xml`` the old server record (UUIDs only,
never a passphrase). They are outside libvirt's swtpm directory on purpose, so
``vtpm-driver audit`` never mistakes them for orphaned TPM state; confirm,
revert and delete remove them. A backup is written in a temporary
``.<uuid>.<random>.tmp`` directory and renamed into place, so it is complete or
absent; nothing here removes a directory that the same call did not create
(issue 13: a second resize's failed ``mkdir`` used to remove the first's backup).
The backup carries the custody generation of the state it copied (the
generation file inside ``swtpm/``, :meth:`ResizeBackups.generation`); a revert
copies it back only when that is the pre-resize generation.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from oslo_log import log as logging

from vtpm_driver import exception
from vtpm_driver.model.server import Instance, require_uuid, server_label
from vtpm_driver.virt import record, state

LOG = logging.getLogger(__name__)

DEFAULT_BACKUP_ROOT = "/var/lib/vtpm-driver/resize"
STATE_BACKUP = "swtpm"
RECORD_STASH = "record.xml"
TMP_SUFFIX = ".tmp"


def copy_tree_preserving(src: Path, dst: Path) -> None:
    """:func:`vtpm_driver.virt.state.copy_tree` (owners and modes kept; symlinks and
    special files refused with :class:`~vtpm_driver.exception.UnsafeStatePath`)."""
    state.copy_tree(src, dst)


class ResizeBackups:
    """The resize backups under ``backup_root`` for TPM state under ``state_base``."""

    def __init__(self, backup_root: str | os.PathLike[str], state_base: str | os.PathLike[str]
                 ) -> None:
        self.backup_root = Path(backup_root)
        self.state_base = state_base

    def __repr__(self) -> str:
        return f"ResizeBackups(backup_root={str(self.backup_root)!r})"

    def backup_dir(self, instance_uuid: str) -> Path:
        """``<backup_root>/<uuid>``. :raises VTPMError: not a UUID."""
        return self.backup_root / require_uuid(instance_uuid, "instance uuid")

    def has_backup(self, instance_uuid: str) -> bool:
        """True while a resize of the server awaits confirm or revert."""
        return self.backup_dir(instance_uuid).exists()

    def discard(self, instance_uuid: str) -> bool:
        """Remove a resize backup; True if there was one. Idempotent."""
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

    def tmp_path(self, instance_uuid: str) -> Path:
        """A new, unused name for a temporary backup directory of this server.

        ``<backup_root>/.<uuid>.<random>.tmp``: the caller journals it, then
        :meth:`make` creates it (exclusively) and renames it into place.
        """
        uuid = require_uuid(instance_uuid, "instance uuid")
        return self.backup_root / f".{uuid}.{secrets.token_hex(8)}{TMP_SUFFIX}"

    def is_tmp_of(self, path: str | os.PathLike[str], instance_uuid: str) -> bool:
        """Whether ``path`` is a temporary backup directory name of this server. Pure."""
        path = Path(path)
        uuid = require_uuid(instance_uuid, "instance uuid")
        return (path.parent == self.backup_root and path.name.startswith(f".{uuid}.")
                and path.name.endswith(TMP_SUFFIX))

    def remove_tmp(self, path: str | os.PathLike[str], instance_uuid: str) -> bool:
        """Remove a temporary backup directory an interrupted resize of this server
        created (named in its journal entry); True if it was there. Refuses any
        other path. Idempotent.

        :raises VTPMError: not such a directory, or it cannot be removed.
        """
        if not self.is_tmp_of(path, instance_uuid):
            raise exception.VTPMError(
                f"refusing to remove {str(path)!r}: not a temporary resize backup of server "
                f"{instance_uuid}")
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise exception.VTPMError(
                f"cannot remove temporary resize backup {str(path)!r}: {exc.strerror}"
            ) from None
        return True

    def make(self, instance: Any, stored: Any, keep_state: bool,
             tmp: Path | None = None) -> None:
        """Back up ``stored`` (the server as recorded) and, with ``keep_state``, its TPM state.

        Written in ``tmp`` (default: a new :meth:`tmp_path`), created here with
        an exclusive ``mkdir``, then renamed to :meth:`backup_dir`: a backup is
        either complete or absent. On failure only ``tmp`` (which this call
        created) is removed; an existing backup of another resize is never
        touched.

        :raises UnsafeStatePath: the live state holds a symlink or special file.
        :raises VTPMError: a backup is already in place, or it could not be
            written (nothing is left half-made).
        """
        path = self.backup_dir(instance.uuid)
        tmp = tmp if tmp is not None else self.tmp_path(instance.uuid)
        live = state.state_dir(self.state_base, instance.uuid)
        created = False
        try:
            os.makedirs(self.backup_root, mode=0o700, exist_ok=True)
            os.mkdir(tmp, 0o700)
            created = True
            (tmp / RECORD_STASH).write_text(record.record_xml(stored))
            if keep_state and live.exists():
                copy_tree_preserving(live, tmp / STATE_BACKUP)
            if path.exists():
                raise FileExistsError(errno.EEXIST, "a resize backup is already in place",
                                      str(path))
            os.rename(tmp, path)  # a complete backup, or none (non-empty target: fails)
        except exception.UnsafeStatePath:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except OSError as exc:
            if created:
                shutil.rmtree(tmp, ignore_errors=True)
            raise exception.VTPMError(
                f"cannot back up the vTPM state of server {server_label(instance)} to "
                f"{str(path)!r}: {exc.strerror or exc}"
            ) from None

    def stashed(self, instance_uuid: str) -> Instance | None:
        """The server as it was before the resize, or None without a backup."""
        path = self.backup_dir(instance_uuid) / RECORD_STASH
        try:
            return record.parse_record_xml(path.read_text())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise exception.VTPMError(f"cannot read {str(path)!r}: {exc.strerror}") from None

    def has_state(self, instance_uuid: str) -> bool:
        """Whether the server's backup holds a TPM state."""
        return (self.backup_dir(instance_uuid) / STATE_BACKUP).is_dir()

    def generation(self, instance_uuid: str) -> int | None:
        """The custody generation of the backed-up TPM state (None: none recorded).

        The backup is a copy of ``<swtpm_state_dir>/<uuid>``, so it carries
        the live state's generation file as it was when the resize began.

        :raises UnsafeStatePath, VirtError: the file cannot be read safely.
        """
        return state.read_generation_in(self.backup_dir(instance_uuid) / STATE_BACKUP)

    def restore_state(self, instance: Any) -> bool:
        """Put the backed-up state back in place; False if there is none."""
        backup = self.backup_dir(instance.uuid) / STATE_BACKUP
        if not backup.exists():
            return False
        state.remove_state(self.state_base, instance.uuid)
        live = state.state_dir(self.state_base, instance.uuid)
        try:
            os.makedirs(live.parent, mode=0o711, exist_ok=True)
            copy_tree_preserving(backup, live)
        except OSError as exc:
            raise exception.VTPMError(
                f"cannot restore the vTPM state of server {server_label(instance)} "
                f"from {str(backup)!r}: {exc.strerror or exc}"
            ) from None
        return True
