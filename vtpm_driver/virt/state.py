"""swtpm state directories on disk (``[vtpm] swtpm_state_dir``).

libvirt keeps each guest's TPM state in ``<base>/<domain-uuid>/``: the
``<uuid>`` directory itself is libvirt's (root, 0711), and inside it
``tpm2/`` (TPM 2.0) or ``tpm1.2/`` (TPM 1.2) belongs to the swtpm user with
the state files ``tpm2-00.permall`` / ``tpm-00.permall``.

Each state file starts with swtpm's blob header (big-endian)::

    byte 0     header version (2)
    byte 1     minimum version able to read it (1)
    bytes 2-3  header size (10)
    bytes 4-5  flags: 0x01 encrypted, 0x02 migration-encrypted,
               0x04 migration data, 0x08 256-bit key
    bytes 6-9  total length of the file

A vTPM started with ``<encryption secret=...>`` under libvirt 9 / swtpm 0.7
writes flags ``0x0009`` (encrypted with an AES-256 key).

Next to swtpm's ``tpm*/`` the ``<uuid>`` directory holds one file of ours,
``vtpm-generation`` (:data:`GENERATION_FILE`, root 0600, a decimal integer and
a newline): the custody generation of this copy of the TPM
(:mod:`vtpm_driver.model.custody`). It lives WITH the state because it must travel
and vanish with it: Nova's cold migration moves the whole ``<uuid>`` directory
(its ``save_and_migrate_vtpm_dir``), our tree copy takes it into resize
backups and off-host copies, and libvirt deletes the directory (file
included) when it deletes the TPM. Anything else (a database, the domain
XML) could outlive the state it describes or be missing where the state is.
It is written atomically (temporary file, fsync, rename) and read with
``O_NOFOLLOW``, like every file here.

Every path here is built from a UUID that went through
:func:`~vtpm_driver.model.server.require_uuid`, so a hostile value can
never make :func:`remove_state` delete anything outside ``base``.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import shutil
import stat
import struct
from pathlib import Path
from typing import NamedTuple

from oslo_log import log as logging

from vtpm_driver import exception
from vtpm_driver.model import request
from vtpm_driver.model.request import show
from vtpm_driver.model.server import canonical_uuid, require_uuid

LOG = logging.getLogger(__name__)

DEFAULT_BASE = "/var/lib/libvirt/swtpm"

_LAYOUT = {
    request.VERSION_2_0: ("tpm2", "tpm2-00.permall"),
    request.VERSION_1_2: ("tpm1.2", "tpm-00.permall"),
}

_HEADER = struct.Struct(">BBHHI")
BLOB_FLAG_ENCRYPTED = 0x01
BLOB_FLAG_MIGRATION_ENCRYPTED = 0x02
BLOB_FLAG_MIGRATION_DATA = 0x04
BLOB_FLAG_ENCRYPTED_256BIT_KEY = 0x08

#: Our custody generation file in ``<base>/<uuid>/`` (see the module docstring).
GENERATION_FILE = "vtpm-generation"

# Files with no content that swtpm creates next to the state (lock files,
# created 0640): they hold nothing secret, so their mode is not a problem.
_CONTENTLESS = frozenset({".lock"})


class BlobHeader(NamedTuple):
    """swtpm's state blob header (see the module docstring)."""

    version: int
    min_version: int
    header_size: int
    flags: int
    total_length: int

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & BLOB_FLAG_ENCRYPTED)


def state_dir(base: str | os.PathLike[str], domain_uuid: str) -> Path:
    """``<base>/<domain-uuid>``: where libvirt keeps this guest's TPM state."""
    return Path(base) / require_uuid(domain_uuid, "domain uuid")


def state_file(base: str | os.PathLike[str], domain_uuid: str, version: str) -> Path:
    """The swtpm state file of a ``1.2`` or ``2.0`` TPM."""
    if version not in _LAYOUT:
        raise exception.InvalidVTPMConfig(
            f"invalid TPM version={show(version)}: allowed values are "
            f"{', '.join(request.VERSIONS)}"
        )
    subdir, name = _LAYOUT[version]
    return state_dir(base, domain_uuid) / subdir / name


def parse_blob_header(data: bytes) -> BlobHeader | None:
    """The header at the start of ``data``, or None if it is not a swtpm blob header."""
    if len(data) < _HEADER.size:
        return None
    header = BlobHeader(*_HEADER.unpack_from(data))
    # Versions 1 and 2 exist; the header is at least 10 bytes and no longer than the file.
    if not 1 <= header.version <= 2 or header.header_size < _HEADER.size:
        return None
    if header.total_length < header.header_size:
        return None
    return header


def _kind(mode: int) -> str:
    """What a file type is called in a refusal. Pure."""
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _open_regular(path: Path, doing: str) -> int:
    """A read-only descriptor of ``path``, never through a symlink.

    :raises UnsafeStatePath: ``path`` is not a regular file.
    :raises OSError: it cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise exception.UnsafeStatePath(str(path), "symlink", doing) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise exception.UnsafeStatePath(str(path), _kind(mode), doing)
    return fd


def _read_head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of a regular file in a real directory, no symlink followed.

    :raises UnsafeStatePath: the file or its directory is a symlink, or the
        file is not a regular file.
    :raises OSError: it cannot be read (``FileNotFoundError`` when it is not there).
    """
    mode = path.parent.lstat().st_mode
    if not stat.S_ISDIR(mode):
        raise exception.UnsafeStatePath(str(path.parent), _kind(mode), "read")
    with os.fdopen(_open_regular(path, "read"), "rb") as handle:
        return handle.read(size)


def read_blob_header(path: str | os.PathLike[str]) -> BlobHeader | None:
    """The blob header of a state file; None if it has none (old or foreign format).

    Neither the file nor the ``tpm*`` directory holding it is read through a
    symlink: the encryption check must judge the file that is there.

    :raises UnsafeStatePath: the file or its directory is a symlink, or the
        file is not a regular file.
    :raises VirtError: the file cannot be read.
    """
    path = Path(path)
    try:
        data = _read_head(path, _HEADER.size)
    except OSError as exc:
        raise exception.VirtError(f"cannot read swtpm state file {str(path)!r}: {exc}") from None
    return parse_blob_header(data)


def copy_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a TPM state tree keeping modes, times, owners and groups: the one tree copy.

    swtpm's files belong to its user (a plain copy would make them root's).
    Only regular files and directories are copied, each checked with
    ``lstat``/``O_NOFOLLOW`` as it is read: a symlink would be recreated on
    another host, or make the copy read any file of this one. ``dst`` must
    not exist (nothing is ever overwritten); on a refusal or error the
    ``dst`` this call made is removed again.

    :raises UnsafeStatePath: something below ``src`` (or ``src``) is not a
        regular file or directory.
    :raises FileExistsError: ``dst`` exists. :raises OSError: the copy failed.
    """
    src, dst = Path(src), Path(dst)
    mode = src.lstat().st_mode
    if not stat.S_ISDIR(mode):
        raise exception.UnsafeStatePath(str(src), _kind(mode), "copy")
    os.mkdir(dst, 0o700)
    try:
        _copy_below(src, dst)
    except Exception:
        shutil.rmtree(dst, ignore_errors=True)
        raise


def _copy_below(src: Path, dst: Path) -> None:
    """Copy the entries of directory ``src`` into the new directory ``dst``, then its stat."""
    for name in sorted(os.listdir(src)):
        source, target = src / name, dst / name
        st = source.lstat()
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(target, 0o700)
            _copy_below(source, target)
            continue
        if not stat.S_ISREG(st.st_mode):
            raise exception.UnsafeStatePath(str(source), _kind(st.st_mode), "copy")
        with os.fdopen(_open_regular(source, "copy"), "rb") as reader:
            out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(out, "wb") as writer:
                shutil.copyfileobj(reader, writer)
            shutil.copystat(source, target, follow_symlinks=False)
            st = os.fstat(reader.fileno())
        os.lchown(target, st.st_uid, st.st_gid)
    st = src.lstat()
    shutil.copystat(src, dst, follow_symlinks=False)
    os.lchown(dst, st.st_uid, st.st_gid)


def has_tpm_state(base: str | os.PathLike[str], domain_uuid: str) -> bool:
    """Whether ``<base>/<uuid>`` holds swtpm state (a ``tpm2``/``tpm1.2`` directory).

    False: a start manufactures a new TPM (nothing old can be started). Not
    followed through symlinks.
    """
    root = state_dir(base, domain_uuid)
    for subdir, _name in _LAYOUT.values():
        try:
            if stat.S_ISDIR((root / subdir).lstat().st_mode):
                return True
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise exception.VirtError(f"cannot inspect swtpm state {str(root)!r}: {exc}"
                                      ) from None
    return False


def read_generation_in(directory: str | os.PathLike[str]) -> int | None:
    """The custody generation stored in a state tree (``<uuid>/`` or a copy of it).

    None when the file is absent or does not hold a generation (a state from
    before custody).

    :raises UnsafeStatePath: the file (or its directory) is a symlink or not
        a regular file.
    :raises VirtError: it exists but cannot be read.
    """
    path = Path(directory) / GENERATION_FILE
    try:
        data = _read_head(path, 64)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise exception.VirtError(f"cannot read TPM generation {str(path)!r}: {exc}") from None
    text = data.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def read_generation(base: str | os.PathLike[str], domain_uuid: str) -> int | None:
    """:func:`read_generation_in` of the guest's state directory ``<base>/<uuid>``."""
    return read_generation_in(state_dir(base, domain_uuid))


def write_generation_in(directory: str | os.PathLike[str], generation: int) -> None:
    """Store ``generation`` in a state tree, atomically; idempotent.

    The directory is created (root, 0711, as libvirt makes it: swtpm then
    creates its ``tpm*`` inside, and a start manufactures a new TPM there) when
    it does not exist yet. Temporary file (``O_EXCL|O_NOFOLLOW``), fsync,
    rename over the old file, fsync of the directory: a reader sees the old or
    the new generation, never a torn one.

    :raises UnsafeStatePath: ``directory`` is a symlink or not a directory.
    :raises VirtError: it cannot be written.
    """
    root = Path(directory)
    tmp = root / f".{GENERATION_FILE}.{os.getpid()}.tmp"
    try:
        try:
            mode = root.lstat().st_mode
        except FileNotFoundError:
            os.makedirs(root.parent, mode=0o711, exist_ok=True)
            os.mkdir(root, 0o711)
            mode = root.lstat().st_mode
        if not stat.S_ISDIR(mode):
            raise exception.UnsafeStatePath(str(root), _kind(mode), "write")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, f"{int(generation)}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, root / GENERATION_FILE)
        dfd = os.open(root, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise exception.VirtError(
            f"cannot write TPM generation {generation} in {str(root)!r}: {exc}") from None


def write_generation(base: str | os.PathLike[str], domain_uuid: str, generation: int) -> None:
    """:func:`write_generation_in` of the guest's state directory ``<base>/<uuid>``."""
    write_generation_in(state_dir(base, domain_uuid), generation)


def is_encrypted(path: str | os.PathLike[str]) -> bool:
    """True if the swtpm state file says it is encrypted (header flag 0x01).

    A file without a recognisable header counts as not encrypted: we only
    claim encryption when swtpm says so.
    """
    header = read_blob_header(path)
    return header is not None and header.encrypted


def remove_state(base: str | os.PathLike[str], domain_uuid: str) -> bool:
    """Delete the guest's state directory; True if it existed, False if already gone.

    :raises VirtError: it exists but is not a plain directory, or deleting failed.
    """
    return _remove_dir(state_dir(base, domain_uuid))


def _remove_dir(path: Path) -> bool:
    """Delete the plain directory ``path`` (never through a symlink); True if it existed.

    :raises VirtError: it exists but is not a plain directory, or deleting failed.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise exception.VirtError(f"cannot inspect swtpm state dir {str(path)!r}: {exc}") from None
    if not stat.S_ISDIR(mode):
        raise exception.VirtError(
            f"refusing to remove swtpm state {str(path)!r}: not a directory"
        )
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise exception.VirtError(f"cannot remove swtpm state dir {str(path)!r}: {exc}") from None
    LOG.debug("Removed swtpm state directory %s", path)
    return True


def remove_tpm(base: str | os.PathLike[str], domain_uuid: str) -> bool:
    """Delete the TPM in the guest's state directory, keeping the directory and its generation.

    Why: a reset (``rebuild --reset-tpm``) must leave a place that says a new
    TPM is wanted there, so that a start after a kill manufactures it
    (:func:`vtpm_driver.model.custody.judge`: a generation without a TPM is
    such a place) instead of refusing a TPM that looks missing. Idempotent;
    True if a TPM was removed.

    :raises VirtError: a TPM directory is not a plain directory, or deleting failed.
    """
    root = state_dir(base, domain_uuid)
    removed = [_remove_dir(root / subdir) for subdir, _name in _LAYOUT.values()]
    return any(removed)


class CreatedStateDir:
    """A state directory this operation created, held open until :meth:`close`.

    Why: the cleanup after a failed operation may remove only the directory it
    created (issue 20 defect 4). Holding it open keeps its inode alive, so a
    directory another writer put at the same path meanwhile (after removing
    this one) always has another ``(st_dev, st_ino)``: :meth:`remove` compares
    them and leaves any other directory alone.

    :raises VirtError: ``path`` cannot be opened as a directory (no symlink
        is followed).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fd: int | None = os.open(
                self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise exception.VirtError(
                f"cannot open swtpm state dir {str(self.path)!r}: {exc.strerror}") from None

    def __repr__(self) -> str:
        return f"CreatedStateDir({str(self.path)!r})"

    def is_current(self) -> bool:
        """Whether the directory at :attr:`path` is still the one created (and held)."""
        if self._fd is None:
            return False
        held = os.fstat(self._fd)
        try:
            now = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)

    def remove(self) -> bool:
        """Delete the directory if it is still the one created; True if it was. Closes it.

        Idempotent. A directory another writer put there is left alone (logged).

        :raises VirtError: deleting failed.
        """
        try:
            if not self.is_current():
                if self.path.exists():
                    LOG.warning("Not removing swtpm state dir %s: another writer replaced "
                                "the one this operation created", self.path)
                return False
            shutil.rmtree(self.path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise exception.VirtError(
                f"cannot remove swtpm state dir {str(self.path)!r}: {exc}") from None
        finally:
            self.close()
        LOG.debug("Removed swtpm state directory %s (created here)", self.path)
        return True

    def close(self) -> None:
        """Let the directory go (it stays on disk). Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def list_state_dirs(base: str | os.PathLike[str]) -> list[str]:
    """Domain UUIDs that have a state directory under ``base`` (sorted; [] if none)."""
    try:
        entries = list(os.scandir(base))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise exception.VirtError(f"cannot list swtpm state dir {str(base)!r}: {exc}") from None
    found = []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        # Only libvirt's per-domain directories, named by the canonical UUID.
        if canonical_uuid(entry.name) == entry.name:
            found.append(entry.name)
    return sorted(found)


def _lookup_ids(user: str, group: str | None) -> tuple[int | None, int | None, list[str]]:
    problems = []
    uid = gid = None
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        problems.append(f"swtpm user {user!r} does not exist")
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            problems.append(f"swtpm group {group!r} does not exist")
    return uid, gid, problems


def check_permissions(
    path: str | os.PathLike[str], user: str, group: str | None = None
) -> list[str]:
    """Problems with a guest's state directory (SPEC G2); empty when all is well.

    ``path`` is a :func:`state_dir`. Rules, matching what libvirt and swtpm
    create: no directory is readable or writable by group/other (libvirt's
    ``<uuid>`` dir is root 0711, which is fine); the ``tpm*`` directories are
    0700 and every state file 0600, owned by ``user`` (and ``group`` if
    given); no symlinks. Empty lock files are not state and are skipped.
    """
    root = Path(path)
    uid, gid, problems = _lookup_ids(user, group)
    try:
        top = root.lstat()
    except FileNotFoundError:
        return [*problems, f"{root}: does not exist"]
    except OSError as exc:
        return [*problems, f"{root}: cannot inspect: {exc}"]
    if not stat.S_ISDIR(top.st_mode):
        return [*problems, f"{root}: not a directory"]

    def owner_problems(where: Path, st: os.stat_result) -> list[str]:
        found = []
        if uid is not None and st.st_uid != uid:
            found.append(f"{where}: owned by uid {st.st_uid}, expected {user} ({uid})")
        if gid is not None and st.st_gid != gid:
            found.append(f"{where}: group is gid {st.st_gid}, expected {group} ({gid})")
        return found

    if stat.S_IMODE(top.st_mode) & 0o066:
        problems.append(f"{root}: mode {stat.S_IMODE(top.st_mode):04o} lets others read or write")
    for dirpath, dirnames, filenames in os.walk(root):
        current = Path(dirpath)
        for name in sorted(dirnames + filenames):
            where = current / name
            try:
                st = where.lstat()
            except OSError as exc:
                problems.append(f"{where}: cannot inspect: {exc}")
                continue
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"{where}: is a symlink")
            elif stat.S_ISDIR(st.st_mode):
                if mode != 0o700:
                    problems.append(f"{where}: directory mode {mode:04o}, expected 0700")
                problems.extend(owner_problems(where, st))
            elif name in _CONTENTLESS and st.st_size == 0:
                continue
            elif current == root and name == GENERATION_FILE and stat.S_ISREG(st.st_mode):
                continue  # ours (root's), no secret: a generation number
            else:
                if mode & 0o177:
                    problems.append(f"{where}: file mode {mode:04o}, expected 0600")
                problems.extend(owner_problems(where, st))
    return problems
