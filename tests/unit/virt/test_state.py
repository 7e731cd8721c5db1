"""swtpm state directory helpers on temporary directories."""

from __future__ import annotations

import grp
import os
import pwd
import struct
from pathlib import Path

import pytest

from tests.fakes.swtpm import ENCRYPTED, blob
from vtpm_driver import exception
from vtpm_driver.virt import state

UUID = "0b7e6f0e-3a8a-4f51-8c1f-1d2a3b4c5d6e"
OTHER = "11111111-2222-4333-8444-555555555555"
ME = pwd.getpwuid(os.getuid()).pw_name
MY_GROUP = grp.getgrgid(os.getgid()).gr_name


def test_paths() -> None:
    assert state.state_dir("/var/lib/libvirt/swtpm", UUID) == Path(
        f"/var/lib/libvirt/swtpm/{UUID}"
    )
    assert state.state_file("/b", UUID.upper(), "2.0") == Path(f"/b/{UUID}/tpm2/tpm2-00.permall")
    assert state.state_file("/b", UUID, "1.2") == Path(f"/b/{UUID}/tpm1.2/tpm-00.permall")


@pytest.mark.parametrize("bad", ["", "..", "../etc", "/", f"{UUID}/..", None, "*"])
def test_paths_refuse_non_uuids(bad: object) -> None:
    with pytest.raises(exception.VirtError, match="domain uuid"):
        state.state_dir("/b", bad)  # type: ignore[arg-type]
    with pytest.raises(exception.VirtError):
        state.remove_state("/b", bad)  # type: ignore[arg-type]


def test_state_file_refuses_bad_version() -> None:
    with pytest.raises(exception.InvalidVTPMConfig, match=r"'3\.0'"):
        state.state_file("/b", UUID, "3.0")


@pytest.mark.parametrize(
    ("flags", "encrypted"), [(0x0009, True), (0x0001, True), (0x0000, False), (0x0008, False)]
)
def test_is_encrypted_reads_flag(tmp_path: Path, flags: int, encrypted: bool) -> None:
    path = tmp_path / "tpm2-00.permall"
    path.write_bytes(blob(flags))
    assert state.is_encrypted(path) is encrypted
    header = state.read_blob_header(path)
    assert header is not None and header.flags == flags and header.header_size == 10


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x02\x01\x00",  # short
        struct.pack(">BBHHI", 9, 1, 10, 1, 20),  # unknown header version
        struct.pack(">BBHHI", 2, 1, 4, 1, 20),  # header too small
        struct.pack(">BBHHI", 2, 1, 10, 1, 5),  # total shorter than header
    ],
)
def test_is_encrypted_false_without_a_header(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert state.is_encrypted(path) is False


def test_is_encrypted_missing_file_is_a_virt_error(tmp_path: Path) -> None:
    with pytest.raises(exception.VirtError, match="cannot read"):
        state.is_encrypted(tmp_path / "nope")


def test_blob_header_of_a_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.write_bytes(blob(ENCRYPTED))
    link = tmp_path / "tpm2-00.permall"
    link.symlink_to(real)
    with pytest.raises(exception.UnsafeStatePath, match=f"{link}.*symlink") as err:
        state.is_encrypted(link)
    assert err.value.path == str(link)
    (tmp_path / "d").mkdir()
    (tmp_path / "tpm2").symlink_to(tmp_path / "d")  # a symlinked directory on the way
    (tmp_path / "d" / "tpm2-00.permall").write_bytes(blob(ENCRYPTED))
    with pytest.raises(exception.UnsafeStatePath, match="symlink"):
        state.read_blob_header(tmp_path / "tpm2" / "tpm2-00.permall")


def test_remove_state_is_idempotent(tmp_path: Path) -> None:
    tpm_dir = tmp_path / UUID / "tpm2"
    tpm_dir.mkdir(parents=True)
    (tpm_dir / "tpm2-00.permall").write_bytes(blob(ENCRYPTED))
    keep = tmp_path / OTHER
    keep.mkdir()
    assert state.remove_state(tmp_path, UUID) is True
    assert not (tmp_path / UUID).exists()
    assert keep.exists()
    assert state.remove_state(tmp_path, UUID) is False
    assert state.remove_state(tmp_path / "missing-base", UUID) is False


def test_remove_state_refuses_symlink_and_files(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("x")
    base = tmp_path / "base"
    base.mkdir()
    (base / UUID).symlink_to(victim)
    with pytest.raises(exception.VirtError, match="not a directory"):
        state.remove_state(base, UUID)
    assert (victim / "precious").exists()
    (base / OTHER).write_text("x")
    with pytest.raises(exception.VirtError, match="not a directory"):
        state.remove_state(base, OTHER)


def test_list_state_dirs(tmp_path: Path) -> None:
    assert state.list_state_dirs(tmp_path / "missing") == []
    (tmp_path / OTHER).mkdir()
    (tmp_path / UUID).mkdir()
    (tmp_path / "not-a-uuid").mkdir()
    (tmp_path / UUID.upper()).mkdir()  # libvirt never writes these
    (tmp_path / "33333333-2222-4333-8444-555555555555").write_text("a file")
    (tmp_path / "44444444-2222-4333-8444-555555555555").symlink_to(tmp_path / UUID)
    assert state.list_state_dirs(tmp_path) == sorted([UUID, OTHER])


def _good_tree(base: Path) -> Path:
    root = base / UUID
    root.mkdir(mode=0o711)
    os.chmod(root, 0o711)
    tpm = root / "tpm2"
    tpm.mkdir()
    os.chmod(tpm, 0o700)
    data = tpm / "tpm2-00.permall"
    data.write_bytes(blob(ENCRYPTED))
    os.chmod(data, 0o600)
    lock = tpm / ".lock"
    lock.touch()
    os.chmod(lock, 0o640)
    return root


def test_check_permissions_accepts_libvirt_layout(tmp_path: Path) -> None:
    root = _good_tree(tmp_path)
    assert state.check_permissions(root, ME, MY_GROUP) == []
    assert state.check_permissions(root, ME) == []


def test_check_permissions_reports_each_problem(tmp_path: Path) -> None:
    root = _good_tree(tmp_path)
    os.chmod(root / "tpm2", 0o755)
    os.chmod(root / "tpm2" / "tpm2-00.permall", 0o644)
    (root / "tpm2" / "link").symlink_to("/etc/passwd")
    problems = state.check_permissions(root, ME)
    text = "\n".join(problems)
    assert "tpm2: directory mode 0755, expected 0700" in text
    assert "tpm2-00.permall: file mode 0644, expected 0600" in text
    assert "link: is a symlink" in text
    assert len(problems) == 3


def test_check_permissions_top_dir_and_owner(tmp_path: Path) -> None:
    root = _good_tree(tmp_path)
    os.chmod(root, 0o755)
    problems = state.check_permissions(root, ME)
    assert any("lets others read or write" in p for p in problems)
    nobody = pwd.getpwnam("nobody")
    if os.getuid() == 0 and nobody.pw_uid != os.getuid():
        os.chmod(root, 0o711)
        problems = state.check_permissions(root, "nobody")
        assert any("owned by uid" in p and "tpm2-00.permall" in p for p in problems)
        assert any("owned by uid" in p and p.split(":")[0].endswith("tpm2") for p in problems)


def test_check_permissions_unknown_user_and_missing_dir(tmp_path: Path) -> None:
    problems = state.check_permissions(tmp_path / UUID, "no-such-user-xyz", "no-such-group-xyz")
    assert "swtpm user 'no-such-user-xyz' does not exist" in problems
    assert "swtpm group 'no-such-group-xyz' does not exist" in problems
    assert any("does not exist" in p and UUID in p for p in problems)


def test_created_state_dir_removes_only_the_directory_it_holds(tmp_path: Path) -> None:
    """Issue 20 defect 4: a cleanup removes the directory its operation created, never
    one another writer put at the same path (the held one keeps its inode)."""
    ours = tmp_path / "swtpm" / "u"
    ours.mkdir(parents=True)
    created = state.CreatedStateDir(ours)
    assert created.is_current()
    assert created.remove() is True and not ours.exists()
    assert created.remove() is False, "idempotent"

    ours.mkdir()
    created = state.CreatedStateDir(ours)
    ours.rmdir()
    ours.mkdir()  # another writer's, made after ours was removed
    (ours / "tpm2").mkdir()
    assert not created.is_current()
    assert created.remove() is False
    assert (ours / "tpm2").is_dir()


# -- the custody generation file (vtpm_driver.model.custody) --------------------------------


def test_generation_is_written_atomically_and_read_back(tmp_path) -> None:
    uuid = "6d2f0d4e-0000-4000-8000-0000000000aa"
    assert state.read_generation(tmp_path, uuid) is None
    state.write_generation(tmp_path, uuid, 3)        # creates <uuid>/ (0711) when missing
    assert state.read_generation(tmp_path, uuid) == 3
    state.write_generation(tmp_path, uuid, 4)
    assert state.read_generation(tmp_path, uuid) == 4
    assert sorted(p.name for p in (tmp_path / uuid).iterdir()) == [state.GENERATION_FILE]
    assert oct((tmp_path / uuid / state.GENERATION_FILE).stat().st_mode & 0o777) == "0o600"
    assert not state.has_tpm_state(tmp_path, uuid)   # no swtpm state: a TPM to manufacture


def test_a_symlinked_generation_file_is_refused(tmp_path) -> None:
    uuid = "6d2f0d4e-0000-4000-8000-0000000000ab"
    (tmp_path / uuid).mkdir()
    (tmp_path / "elsewhere").write_text("9\n")
    (tmp_path / uuid / state.GENERATION_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(exception.UnsafeStatePath, match="symlink"):
        state.read_generation(tmp_path, uuid)


def test_a_garbled_generation_file_counts_as_none(tmp_path) -> None:
    uuid = "6d2f0d4e-0000-4000-8000-0000000000ac"
    (tmp_path / uuid).mkdir()
    (tmp_path / uuid / state.GENERATION_FILE).write_text("seven\n")
    assert state.read_generation(tmp_path, uuid) is None
