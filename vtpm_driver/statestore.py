"""Off-host copies of servers' TPM state (issue 15): Nova's shelve and evacuation, state backups.

Where a copy lives
    :class:`DirectoryStateStore` keeps one directory per server under
    ``[vtpm] state_backup_dir`` (default ``/var/lib/vtpm-driver/state-store``)::

        <root>/<uuid>/meta.json    what the copy is (below), 0600
        <root>/<uuid>/record.xml   the server record (:mod:`vtpm_driver.virt.record`), 0600
        <root>/<uuid>/swtpm/       the host's ``swtpm/<uuid>/`` as swtpm wrote it
                                   (owners and modes kept: tss, 0700/0600)

    The root is root-only (0700). It stands in for object storage: it must be
    reachable from every compute host (shared or replicated storage, outside
    every host's own directories) and survive any host. Nova's shim can plug
    in Glance or Swift behind the same :class:`StateStore` protocol.

Who can read it
    The swtpm state is stored exactly as swtpm wrote it: encrypted with the
    server's passphrase (:meth:`DirectoryStateStore.put` refuses a state file
    whose swtpm blob header lacks the encrypted flag, and ``meta.json`` records
    that header). A copy reveals nothing without the passphrase, which only
    the owner (``user``/``host`` modes) or the service user (``deployment``)
    can read from Barbican. Root on the machine holding the store can copy the
    files, as root on a host can; neither can decrypt them.

When it is refreshed (``[vtpm] state_backup``)
    Nova's shelve always stores a copy (the server then lives only there).
    ``on-stop``: every clean stop and suspend also refreshes it. ``periodic``:
    as ``on-stop``, and ``vtpm-driver state backup`` (an operator runs it from
    cron) refreshes copies older than ``[vtpm] state_backup_interval``, running
    servers included. ``off``: no other copy, so evacuation is refused.

A copy is current only if it was taken from a stopped server that has not
run since (:func:`vtpm_driver.model.rules.copy_is_current`); every start of the
server marks its copy as overtaken (``started_after``).

Writes are atomic and crash-safe: a new copy is built (and fsynced) in
``<root>/.<uuid>.<random>.tmp``; the previous copy is set aside as
``<root>/.<uuid>.prev`` (one fixed name), the new one renamed into place, and
only then the set-aside one removed. A reader (:meth:`~DirectoryStateStore.get`,
``record``, ``restore``, ``list``) falls back to ``.<uuid>.prev`` while
``<uuid>`` is absent, so a kill at any point leaves the old or the new complete
copy found, never none and never half of one. ``meta.json`` is replaced with
``os.replace``. What a killed write leaves over (a ``.tmp``, a ``.prev`` beside
its copy) is listed by :meth:`~DirectoryStateStore.temporaries` for
``vtpm-driver audit``.

"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Protocol

from oslo_log import log as logging

from vtpm_driver import exception
from vtpm_driver.model.server import canonical_uuid, require_uuid
from vtpm_driver.virt import state

LOG = logging.getLogger(__name__)

META = "meta.json"
RECORD = "record.xml"
STATE = "swtpm"
TMP_SUFFIX = ".tmp"
PREV_SUFFIX = ".prev"


@dataclasses.dataclass(frozen=True)
class CopyMeta:
    """What an off-host copy is (``meta.json``); never a passphrase."""

    uuid: str
    name: str
    taken_at: float                 # seconds since the epoch
    source_host: str | None
    reason: str                     # shelve | stop | suspend | periodic | manual
    server_running: bool = False    # taken while the guest ran (already behind)
    shelved: bool = False           # the server lives only here
    started_after: float | None = None  # the server started after the copy was taken
    tpm_version: str | None = None
    secret_security: str | None = None
    project_id: str | None = None
    user_id: str | None = None      # the owner when taken (None: taken by an older version)
    header_flags: int | None = None
    encrypted: bool | None = None
    size: int = 0
    generation: int | None = None   # custody generation (model.custody); None: older copy

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CopyMeta:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class StateStore(Protocol):
    """Off-host copies, one per server. Implementations raise only VTPMError."""

    def put(self, meta: CopyMeta, record: str, state_dir: Path | None) -> CopyMeta:
        """Store a complete copy (replacing the previous one atomically)."""

    def get(self, instance_uuid: str) -> CopyMeta | None:
        """The copy's metadata, or None."""

    def record(self, instance_uuid: str) -> str:
        """The stored server record. :raises VTPMError: no copy."""

    def restore(self, instance_uuid: str, dest: Path) -> bool:
        """Write the stored TPM state to ``dest`` (a host's ``swtpm/<uuid>``); False: none."""

    def update(self, instance_uuid: str, **changes: Any) -> CopyMeta | None:
        """Change metadata fields (e.g. ``started_after``); None without a copy."""

    def delete(self, instance_uuid: str) -> bool:
        """Remove the copy; True if there was one. Idempotent."""

    def list(self) -> list[CopyMeta]:
        """Every copy (unreadable ones skipped with a warning)."""


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fsync(path: Path) -> None:
    """Flush a file or directory (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file and directory below ``path`` (and it): a rename then
    publishes contents that are on disk, not only their names."""
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            _fsync(Path(dirpath, name))
        _fsync(Path(dirpath))


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


class DirectoryStateStore:
    """:class:`StateStore` in a root-only directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"DirectoryStateStore({str(self.root)!r})"

    def path(self, instance_uuid: str) -> Path:
        """``<root>/<uuid>``. :raises VTPMError: not a UUID."""
        return self.root / require_uuid(instance_uuid, "instance uuid")

    def _fail(self, what: str, exc: OSError) -> exception.VTPMError:
        return exception.VTPMError(f"off-host TPM state store {str(self.root)!r}: cannot {what}: "
                                   f"{exc.strerror or exc}")

    def put(self, meta: CopyMeta, record: str, state_dir: Path | None) -> CopyMeta:
        """Copy ``state_dir`` (a host's ``swtpm/<uuid>``) and the record in, atomically.

        The encryption check reads the copied state file, not the source, so
        what is stored is what was checked (a running swtpm may rewrite its
        file meanwhile). A state without ``meta.tpm_version`` cannot be checked
        and is refused too.

        :raises UnsafeStatePath: the state holds a symlink or anything but regular
            files and directories (never copied, never followed).
        :raises VTPMError: the state is not encrypted (never stored off-host),
            or it could not be written (the previous copy, if any, is kept).
        """
        uuid = require_uuid(meta.uuid, "instance uuid")
        meta = dataclasses.replace(meta, uuid=uuid)
        final = self.path(uuid)
        tmp = self.root / f".{uuid}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        if state_dir is not None and meta.tpm_version is None:
            raise exception.VTPMError(
                f"refusing to copy the TPM state of server {meta.name!r} ({uuid}) off the "
                "host: no TPM version given, so its encryption cannot be checked")
        created = False
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)
            os.mkdir(tmp, 0o700)
            created = True
            if state_dir is not None:
                state.copy_tree(state_dir, tmp / STATE)
                meta = self._check_encrypted(meta, tmp)
                meta = dataclasses.replace(meta, size=_tree_size(tmp / STATE))
            _write(tmp / RECORD, record)
            _write(tmp / META, meta.to_json())
            _fsync_tree(tmp)
            self._install(uuid, tmp)
            created = False
        except (OSError, exception.VTPMError) as exc:
            if created:
                shutil.rmtree(tmp, ignore_errors=True)
            self._put_back(uuid)
            if isinstance(exc, exception.VTPMError):
                raise
            raise self._fail(f"store the copy of server {meta.name!r} ({uuid})", exc) from None
        LOG.info("Stored an off-host copy of the TPM state (%s, %d bytes, from %s) in %s",
                 meta.reason, meta.size, meta.source_host, final, instance_uuid=uuid)
        return meta

    def _prev(self, uuid: str) -> Path:
        """``<root>/.<uuid>.prev``: the previous copy while a put replaces it."""
        return self.root / f".{uuid}{PREV_SUFFIX}"

    def _install(self, uuid: str, tmp: Path) -> None:
        """Rename the complete copy ``tmp`` into place, the old one found until then.

        At every point of this, ``<uuid>`` or ``.<uuid>.prev`` is a complete
        copy (the newest of them is what readers see): a ``.prev`` beside a
        ``<uuid>`` is a leftover of an earlier kill after its swap (removed
        first); a ``.prev`` alone IS the copy (never removed before the new one
        is in place).

        :raises OSError: a rename failed (the caller puts the old copy back).
        """
        final, prev = self.path(uuid), self._prev(uuid)
        if final.exists():
            if prev.exists():
                shutil.rmtree(prev)
            os.rename(final, prev)
            _fsync(self.root)
        os.rename(tmp, final)
        _fsync(self.root)
        if prev.exists():
            shutil.rmtree(prev)

    def _put_back(self, uuid: str) -> None:
        """After a failed put: the set-aside copy back under its name. Best effort."""
        final, prev = self.path(uuid), self._prev(uuid)
        if prev.exists() and not final.exists():
            try:
                os.rename(prev, final)
            except OSError as exc:  # readers still find it as .prev
                LOG.warning("Could not rename %s back to %s: %s", prev, final, exc)

    def _read(self, uuid: str, name: str) -> str:
        """``name`` of the copy: ``<uuid>/name``, else the set-aside ``.<uuid>.prev/name``.

        :raises FileNotFoundError: no copy. :raises OSError: unreadable.
        """
        final = self.path(uuid)
        for where in (final, self._prev(final.name), final):
            try:
                return (where / name).read_text()
            except FileNotFoundError:
                continue
        raise FileNotFoundError(errno.ENOENT, "no copy", str(final / name))

    def _current(self, uuid: str) -> Path | None:
        """The directory of the copy readers see (``<uuid>`` or ``.<uuid>.prev``), or None."""
        final = self.path(uuid)
        for where in (final, self._prev(final.name)):
            if (where / META).exists():
                return where
        return None

    @staticmethod
    def _check_encrypted(meta: CopyMeta, tmp: Path) -> CopyMeta:
        """``meta`` with the copied state file's header. :raises VTPMError: not encrypted."""
        inside = state.state_file("/", meta.uuid, str(meta.tpm_version)).relative_to(
            state.state_dir("/", meta.uuid))
        header = state.read_blob_header(tmp / STATE / inside)
        if header is None or not header.encrypted:
            raise exception.VTPMError(
                f"refusing to copy the TPM state of server {meta.name!r} ({meta.uuid}) off the "
                "host: swtpm's header does not say it is encrypted")
        return dataclasses.replace(meta, header_flags=header.flags, encrypted=True)

    def get(self, instance_uuid: str) -> CopyMeta | None:
        try:
            return CopyMeta.from_json(self._read(instance_uuid, META))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise exception.VTPMError(
                f"off-host TPM state store: unreadable copy of {instance_uuid}: {exc}") from None

    def record(self, instance_uuid: str) -> str:
        try:
            return self._read(instance_uuid, RECORD)
        except OSError as exc:
            raise self._fail(f"read the record of {instance_uuid}", exc) from None

    def restore(self, instance_uuid: str, dest: Path) -> bool:
        """:raises UnsafeStatePath: the copy holds a symlink or special file (nothing
            is left at ``dest``).
        :raises VTPMError: ``dest`` exists already (never overwritten) or the copy failed."""
        found = self._current(instance_uuid)
        src = found / STATE if found is not None else None
        if src is None or not src.is_dir():
            return False
        dest = Path(dest)
        try:
            os.makedirs(dest.parent, mode=0o711, exist_ok=True)
            state.copy_tree(src, dest)
        except FileExistsError:
            raise exception.VTPMError(
                f"cannot restore the TPM state of {instance_uuid}: {dest} exists already"
            ) from None
        except OSError as exc:
            # copy_tree removed the dest it made; any other is not ours to remove.
            raise self._fail(f"restore the state of {instance_uuid} to {dest}", exc) from None
        return True

    def update(self, instance_uuid: str, **changes: Any) -> CopyMeta | None:
        meta = self.get(instance_uuid)
        if meta is None:
            return None
        meta = dataclasses.replace(meta, **changes)
        target = (self._current(instance_uuid) or self.path(instance_uuid)) / META
        tmp = target.with_name(f".{META}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            _write(tmp, meta.to_json())
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._fail(f"update the copy of {instance_uuid}", exc) from None
        return meta

    def delete(self, instance_uuid: str) -> bool:
        path = self.path(instance_uuid)
        found = False
        for where in (path, self._prev(path.name)):
            try:
                shutil.rmtree(where)
                found = True
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise self._fail(f"remove the copy of {instance_uuid}", exc) from None
        if not found:
            return False
        LOG.info("Removed the off-host copy of the TPM state", instance_uuid=instance_uuid)
        return True

    def list(self) -> list[CopyMeta]:
        try:
            entries = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._fail("list copies", exc) from None
        found = []
        present = set(entries)
        for entry in entries:
            name = entry
            if entry.startswith(".") and entry.endswith(PREV_SUFFIX):
                name = entry[1:-len(PREV_SUFFIX)]  # a copy set aside by a killed put
                if name in present:
                    continue  # ... and overtaken: the copy is <uuid>
            if canonical_uuid(name) != name:
                continue  # temporary or foreign entries
            try:
                meta = self.get(name)
            except exception.VTPMError as exc:
                LOG.warning("%s", exc)
                continue
            if meta is not None:
                found.append(meta)
        return found

    def temporaries(self) -> list[str]:
        """Names of leftover temporary entries (an interrupted put), for the audit.

        A ``.tmp`` (a copy being built, or one a killed put left) and a
        ``.<uuid>.prev`` beside its ``<uuid>`` (a killed put's set-aside old
        copy); a ``.prev`` alone is the copy itself, not a leftover.

        :raises VTPMError: the root cannot be listed.
        """
        try:
            entries = set(os.listdir(self.root))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._fail("list temporaries", exc) from None
        return sorted(n for n in entries if n.endswith(TMP_SUFFIX) or (
            n.startswith(".") and n.endswith(PREV_SUFFIX)
            and n[1:-len(PREV_SUFFIX)] in entries))
