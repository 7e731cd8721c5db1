"""statestore.DirectoryStateStore on a real directory: atomic copies, never a plain state.

Each test builds a swtpm-like state directory (``<base>/<uuid>/tpm2/tpm2-00.permall``
with swtpm's blob header) under ``tmp_path`` and stores, lists, restores, updates
and deletes copies of it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid as uuid_mod
from pathlib import Path

import pytest

from tests.fakes import swtpm
from tests.fakes.swtpm import ENCRYPTED, PLAIN, blob
from vtpm_driver import exception, statestore
from vtpm_driver.statestore import CopyMeta, DirectoryStateStore

RECORD = "<server-record/>"
# swtpm's files belong to its user, not to whoever copies them (chown needs root).
SWTPM_OWNER = 65534 if os.geteuid() == 0 else None


def make_state(base: Path, server_uuid: str, **kwargs) -> Path:
    """:func:`tests.fakes.swtpm.make_state` with swtpm's ``.lock`` and, as root, its owner."""
    return swtpm.make_state(base, server_uuid, lock=True, owner=SWTPM_OWNER, **kwargs)


def meta_for(server_uuid: str, **fields) -> CopyMeta:
    values = {"uuid": server_uuid, "name": "vm1", "taken_at": 1000.0,
              "source_host": "host-a", "reason": "stop", "tpm_version": "2.0",
              "secret_security": "user", "project_id": "proj-a"}
    values.update(fields)
    return CopyMeta(**values)


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStateStore:
    return DirectoryStateStore(tmp_path / "store")


@pytest.fixture
def sid() -> str:
    return str(uuid_mod.uuid4())


def tree(path: Path) -> dict[str, tuple[bytes | None, int, int, int]]:
    """Every entry below ``path``: contents (files), mode, owner, group."""
    found = {}
    for entry in sorted(path.rglob("*")):
        st = entry.lstat()
        data = entry.read_bytes() if entry.is_file() else None
        found[str(entry.relative_to(path))] = (data, st.st_mode & 0o7777, st.st_uid, st.st_gid)
    return found


# --------------------------------------------------------------------------- put


def test_put_stores_state_record_and_meta_root_only(store, sid, tmp_path) -> None:
    source = make_state(tmp_path / "swtpm", sid)
    stored = store.put(meta_for(sid), RECORD, source)

    assert stored.encrypted is True and stored.header_flags == ENCRYPTED
    assert stored.size == len(blob(ENCRYPTED))
    copy = store.path(sid)
    assert tree(copy / "swtpm") == tree(source)  # bytes, modes and owners as swtpm wrote them
    assert (copy / "record.xml").read_text() == RECORD
    on_disk = json.loads((copy / "meta.json").read_text())
    assert on_disk["encrypted"] is True and on_disk["source_host"] == "host-a"
    assert store.get(sid) == stored
    for path, mode in ((store.root, 0o700), (copy, 0o700), (copy / "meta.json", 0o600),
                       (copy / "record.xml", 0o600)):
        assert path.stat().st_mode & 0o777 == mode, path
    assert store.temporaries() == []


def test_put_replaces_the_previous_copy_whole(store, sid, tmp_path) -> None:
    store.put(meta_for(sid, reason="periodic", server_running=True), "<old/>",
              make_state(tmp_path / "first", sid, payload=b"old state"))
    (store.path(sid) / "swtpm" / "tpm2" / "leftover").write_bytes(b"x")

    second = make_state(tmp_path / "second", sid, payload=b"new state, longer")
    stored = store.put(meta_for(sid, taken_at=2000.0), "<new/>", second)

    copy = store.path(sid)
    assert tree(copy / "swtpm") == tree(second)  # nothing of the old copy is left
    assert (copy / "record.xml").read_text() == "<new/>"
    assert store.get(sid) == stored
    assert stored.taken_at == 2000.0 and stored.server_running is False
    assert [m.uuid for m in store.list()] == [sid]
    assert sorted(os.listdir(store.root)) == [sid]  # no temporary or old directory


def test_failed_put_keeps_the_previous_copy(store, sid, tmp_path) -> None:
    first = store.put(meta_for(sid), RECORD, make_state(tmp_path / "swtpm", sid))
    before = tree(store.path(sid))
    with pytest.raises(exception.VTPMError, match="cannot store the copy"):
        store.put(meta_for(sid, taken_at=2000.0), "<new/>", tmp_path / "missing" / sid)
    assert tree(store.path(sid)) == before
    assert store.get(sid) == first
    assert store.temporaries() == []


class Killed(BaseException):
    """``kill -9`` at a step: no ``except``/``finally`` of the code under test handles it."""


def kill_at_rename(monkeypatch, store: DirectoryStateStore, sid: str, *, to_final: bool
                   ) -> None:
    """Die at the rename that installs the new copy (``to_final``) or the one after it."""
    real = os.rename

    def rename(src, dst):
        if to_final and Path(dst) == store.path(sid):
            raise Killed(dst)
        real(src, dst)

    monkeypatch.setattr(statestore.os, "rename", rename)
    if not to_final:
        monkeypatch.setattr(statestore.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(
            Killed(a[0])))


def test_put_killed_between_its_renames_keeps_the_previous_copy_found(
        store, sid, tmp_path, monkeypatch) -> None:
    first = store.put(meta_for(sid), "<old/>", make_state(tmp_path / "a", sid, payload=b"old"))
    kill_at_rename(monkeypatch, store, sid, to_final=True)
    with pytest.raises(Killed):
        store.put(meta_for(sid, taken_at=2000.0), "<new/>",
                  make_state(tmp_path / "b", sid, payload=b"new"))
    monkeypatch.undo()

    assert store.get(sid) == first  # the old complete copy, never "no copy"
    assert store.record(sid) == "<old/>"
    assert [m.uuid for m in store.list()] == [sid]
    dest = tmp_path / "restored" / sid
    assert store.restore(sid, dest) is True
    assert tree(dest) == tree(tmp_path / "a" / sid)
    assert store.update(sid, started_after=5.0).started_after == 5.0
    # The next put completes and leaves nothing behind but the half-built temporary.
    third = store.put(meta_for(sid, taken_at=3000.0), "<third/>",
                      make_state(tmp_path / "c", sid, payload=b"third"))
    assert store.get(sid) == third and store.record(sid) == "<third/>"
    assert [n for n in os.listdir(store.root) if not n.endswith(".tmp")] == [sid]
    assert store.delete(sid) is True and store.get(sid) is None


def test_put_killed_after_installing_the_new_copy_reads_the_new_one(
        store, sid, tmp_path, monkeypatch) -> None:
    store.put(meta_for(sid), "<old/>", make_state(tmp_path / "a", sid, payload=b"old"))
    kill_at_rename(monkeypatch, store, sid, to_final=False)
    with pytest.raises(Killed):
        store.put(meta_for(sid, taken_at=2000.0), "<new/>",
                  make_state(tmp_path / "b", sid, payload=b"new"))
    monkeypatch.undo()
    assert store.get(sid).taken_at == 2000.0 and store.record(sid) == "<new/>"
    assert store.temporaries()  # the set-aside old copy is reported
    assert store.delete(sid) is True
    assert store.get(sid) is None and os.listdir(store.root) == []


def test_put_without_state_stores_the_record(store, sid) -> None:
    stored = store.put(meta_for(sid, tpm_version=None), RECORD, None)
    assert stored.size == 0 and stored.encrypted is None
    assert store.record(sid) == RECORD
    assert store.restore(sid, Path("/nonexistent") / sid) is False


def test_put_canonicalises_the_uuid(store, sid, tmp_path) -> None:
    stored = store.put(meta_for(sid.upper()), RECORD, make_state(tmp_path / "swtpm", sid))
    assert stored.uuid == sid
    assert [m.uuid for m in store.list()] == [sid]


@pytest.mark.parametrize("content", [blob(PLAIN), blob(0x08), b"no header",
                                     b"\x07\x01\x00\x0a\x00\x01\x00\x00\x00\x20"])
def test_put_refuses_a_state_not_marked_encrypted(store, sid, tmp_path, content) -> None:
    source = make_state(tmp_path / "swtpm", sid)
    (source / "tpm2" / "tpm2-00.permall").write_bytes(content)
    with pytest.raises(exception.VTPMError, match="does not say it is encrypted"):
        store.put(meta_for(sid), RECORD, source)
    assert store.get(sid) is None and store.list() == []
    assert store.temporaries() == []


def test_put_refuses_a_plain_state_over_an_existing_copy(store, sid, tmp_path) -> None:
    good = store.put(meta_for(sid), RECORD, make_state(tmp_path / "a", sid))
    with pytest.raises(exception.VTPMError, match="does not say it is encrypted"):
        store.put(meta_for(sid, taken_at=2000.0), RECORD,
                  make_state(tmp_path / "b", sid, flags=PLAIN))
    assert store.get(sid) == good
    assert store.temporaries() == []


def test_put_refuses_a_state_it_cannot_check(store, sid, tmp_path) -> None:
    source = make_state(tmp_path / "swtpm", sid)
    with pytest.raises(exception.VTPMError, match="no TPM version"):
        store.put(meta_for(sid, tpm_version=None), RECORD, source)
    (source / "tpm2" / "tpm2-00.permall").unlink()
    with pytest.raises(exception.VTPMError, match="cannot read swtpm state file"):
        store.put(meta_for(sid), RECORD, source)
    assert store.list() == [] and store.temporaries() == []


@pytest.mark.parametrize("where", ["state file", "extra file", "directory"])
def test_put_refuses_symlinks_in_the_state(store, sid, tmp_path, where) -> None:
    """A symlink is neither copied (it would be recreated on another host) nor followed by
    the encryption check."""
    source = make_state(tmp_path / "swtpm", sid)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "tpm2-00.permall").write_bytes(blob(ENCRYPTED))
    link = {"state file": source / "tpm2" / "tpm2-00.permall",
            "extra file": source / "tpm2" / "extra",
            "directory": source / "tpm2"}[where]
    if link.is_dir():
        for child in link.iterdir():
            child.unlink()
        link.rmdir()
        link.symlink_to(outside)
    else:
        link.unlink(missing_ok=True)
        link.symlink_to(outside / "tpm2-00.permall")
    with pytest.raises(exception.UnsafeStatePath, match=f"{link}.*symlink"):
        store.put(meta_for(sid), RECORD, source)
    assert store.get(sid) is None and store.temporaries() == []


def test_restore_refuses_a_symlink_planted_in_the_store(store, sid, tmp_path) -> None:
    store.put(meta_for(sid), RECORD, make_state(tmp_path / "swtpm", sid))
    planted = store.path(sid) / "swtpm" / "tpm2" / "planted"
    planted.symlink_to("/etc/shadow")
    dest = tmp_path / "host-b" / sid
    with pytest.raises(exception.UnsafeStatePath, match=str(planted)):
        store.restore(sid, dest)
    assert not dest.exists()


def test_put_refuses_a_name_that_is_no_uuid(store, tmp_path) -> None:
    with pytest.raises(exception.VTPMError, match="expected a UUID"):
        store.put(meta_for("../etc"), RECORD, None)
    assert not store.root.exists()


# --------------------------------------------------------------------------- restore


def test_restore_writes_the_state_as_stored(store, sid, tmp_path) -> None:
    source = make_state(tmp_path / "swtpm-a", sid)
    store.put(meta_for(sid), RECORD, source)
    dest = tmp_path / "swtpm-b" / sid
    assert store.restore(sid, dest) is True
    assert tree(dest) == tree(source)
    assert dest.parent.stat().st_mode & 0o777 == 0o711
    assert store.get(sid) is not None  # restoring keeps the copy


def test_restore_never_overwrites(store, sid, tmp_path) -> None:
    store.put(meta_for(sid), RECORD, make_state(tmp_path / "swtpm-a", sid, payload=b"copy"))
    existing = make_state(tmp_path / "swtpm-b", sid, payload=b"the host's own TPM")
    before = tree(existing)
    with pytest.raises(exception.VTPMError, match="exists already"):
        store.restore(sid, existing)
    assert tree(existing) == before


def test_a_failed_restore_never_removes_a_state_another_writer_made(
        store, sid, tmp_path, monkeypatch) -> None:
    """Issue 20 defect 4: the copy vanished under the restore (deleted by another
    writer) while another writer put a state at ``dest``: the failed restore
    removed that state, which it had not created."""
    store.put(meta_for(sid), RECORD, make_state(tmp_path / "swtpm-a", sid, payload=b"copy"))
    theirs = make_state(tmp_path / "swtpm-b", sid, payload=b"another writer's TPM")
    before = tree(theirs)
    copy_tree = statestore.state.copy_tree

    def raced(src, dst):
        store.delete(sid)  # between the restore's look at the copy and its copy
        return copy_tree(src, dst)

    monkeypatch.setattr(statestore.state, "copy_tree", raced)
    with pytest.raises(exception.VTPMError, match=f"restore the state of {sid}"):
        store.restore(sid, theirs)
    assert tree(theirs) == before


def test_restore_without_a_copy_is_false(store, sid, tmp_path) -> None:
    dest = tmp_path / "swtpm" / sid
    assert store.restore(sid, dest) is False
    assert not dest.exists()


# --------------------------------------------------------------------------- update, delete


def test_update_changes_fields_and_is_idempotent(store, sid, tmp_path) -> None:
    store.put(meta_for(sid), RECORD, make_state(tmp_path / "swtpm", sid))
    state_before = tree(store.path(sid) / "swtpm")

    first = store.update(sid, started_after=1234.5)
    again = store.update(sid, started_after=1234.5)
    assert first == again == store.get(sid)
    assert first.started_after == 1234.5 and first.encrypted is True
    assert json.loads((store.path(sid) / "meta.json").read_text())["started_after"] == 1234.5
    assert tree(store.path(sid) / "swtpm") == state_before
    assert sorted(os.listdir(store.path(sid))) == ["meta.json", "record.xml", "swtpm"]
    assert store.update(str(uuid_mod.uuid4()), started_after=1.0) is None


def test_delete_is_idempotent(store, sid, tmp_path) -> None:
    other = str(uuid_mod.uuid4())
    store.put(meta_for(sid), RECORD, make_state(tmp_path / "swtpm", sid))
    store.put(meta_for(other, name="vm2"), RECORD, make_state(tmp_path / "swtpm", other))
    assert store.delete(sid) is True
    assert store.delete(sid) is False
    assert store.get(sid) is None and not store.path(sid).exists()
    assert [m.uuid for m in store.list()] == [other]
    assert DirectoryStateStore(tmp_path / "never-made").delete(sid) is False


def test_record_of_no_copy_is_an_error(store, sid) -> None:
    with pytest.raises(exception.VTPMError, match="cannot read the record"):
        store.record(sid)


# --------------------------------------------------------------------------- list, temporaries


def test_list_skips_temporaries_foreign_and_unreadable_entries(store, sid, tmp_path,
                                                                caplog) -> None:
    good = store.put(meta_for(sid), RECORD, make_state(tmp_path / "swtpm", sid))
    broken, bare = str(uuid_mod.uuid4()), str(uuid_mod.uuid4())
    (store.root / broken).mkdir()
    (store.root / broken / "meta.json").write_text("{not json")
    (store.root / bare).mkdir()  # no meta.json: not a copy
    (store.root / f".{sid}.abcdef.tmp").mkdir()
    (store.root / f".{sid}.012345.old.tmp").mkdir()
    (store.root / "lost+found").mkdir()
    (store.root / sid.upper()).mkdir()  # not how the store names a copy

    with caplog.at_level(logging.WARNING, logger="vtpm_driver.statestore"):
        assert store.list() == [good]
    assert any(broken in r.getMessage() for r in caplog.records)
    with pytest.raises(exception.VTPMError, match="unreadable copy"):
        store.get(broken)
    assert store.temporaries() == [f".{sid}.012345.old.tmp", f".{sid}.abcdef.tmp"]


def test_list_and_temporaries_of_a_missing_root_are_empty(tmp_path) -> None:
    store = DirectoryStateStore(tmp_path / "absent")
    assert store.list() == [] and store.temporaries() == []
    assert not store.root.exists()


def test_meta_ignores_unknown_fields_and_holds_no_secret(sid) -> None:
    meta = meta_for(sid, server_running=True)
    data = json.loads(meta.to_json())
    data["written_by_a_newer_version"] = 1
    assert CopyMeta.from_json(json.dumps(data)) == meta
    assert not any("passphrase" in f.name or "secret_uuid" in f.name
                   for f in dataclasses.fields(CopyMeta))
