"""ops.resize through VTPMDriver: resize and revert on this host (SPEC F4)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.fakes.swtpm import custody_free
from tests.unit.conftest import (
    KERNEL,
    MEMBER,
    OWNER,
    Env,
    resize_to,
)
from vtpm_driver import exception
from vtpm_driver.model.server import Flavor
from vtpm_driver.ops import backup
from vtpm_driver.standalone import servers
from vtpm_driver.virt import domain, record

# --------------------------------------------------------------------------- resize


def test_f4_resize_keeping_the_tpm_keeps_its_state(env: Env) -> None:
    inst = env.spawn(env.instance())
    ek = env.state_file(inst).read_bytes()
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]
    resize_to(env, inst, {"hw:tpm_version": "2.0"})
    assert env.state_file(inst).read_bytes() == ek
    assert inst.system_metadata["vtpm_secret_uuid"] == secret_uuid
    stored = record.get_server_record(env.dom(inst).xml)
    assert (stored.flavor.vcpus, stored.flavor.memory_mb) == (2, 512)
    assert not (env.tmp / "resize" / inst.uuid).exists()
    assert env.conn.secrets == {} and env.dom(inst).active


def test_f4_version_change_is_a_fresh_tpm_and_revert_restores_the_old(env: Env) -> None:
    inst = env.spawn(env.instance())
    old_file = env.state_file(inst)
    ek = old_file.read_bytes()
    before = old_file.stat()
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]
    new = Flavor(extra_specs={"hw:tpm_version": "1.2"})
    inst.new_flavor = new
    env.drv.migrate_disk_and_power_off(OWNER, inst, "localhost", new, None)
    backup = env.tmp / "resize" / inst.uuid
    assert (backup / "swtpm" / "tpm2" / "tpm2-00.permall").read_bytes() == ek
    assert stat.S_IMODE(backup.stat().st_mode) == 0o700
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    assert not old_file.exists(), "fresh TPM: the 2.0 state is gone"
    assert env.state_file(inst, "1.2").exists()
    assert domain.get_tpm(env.dom(inst).xml) == ("1.2", "tpm-tis", secret_uuid)
    # Revert: Nova has put the old flavor back.
    inst.flavor = inst.old_flavor
    env.reset()
    env.drv.finish_revert_migration(OWNER, inst, None, None)
    assert env.names()[0] == "barbican.get"
    assert old_file.read_bytes() == ek
    after = old_file.stat()
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (
        before.st_uid, before.st_gid, stat.S_IMODE(before.st_mode))
    assert not env.state_file(inst, "1.2").exists()
    assert domain.get_tpm(env.dom(inst).xml) == ("2.0", "tpm-tis", secret_uuid)
    assert record.get_server_record(env.dom(inst).xml).flavor.extra_specs == {
        "hw:tpm_version": "2.0", "hw:tpm_secret_security": "user"}
    assert not backup.exists() and env.dom(inst).active


def test_f4_vtpm_added_creates_a_secret_and_revert_deletes_it(env: Env) -> None:
    inst = servers.new_instance("plain", OWNER, kernel=KERNEL)
    env.spawn(inst)
    resize_to(env, inst, {"hw:tpm_version": "2.0"}, revert=True)
    assert env.km.passphrases == {} and "vtpm_secret_uuid" not in inst.system_metadata
    assert domain.get_tpm(env.dom(inst).xml) is None
    assert not (env.state_base / inst.uuid).exists()
    resize_to(env, inst, {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"})
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]
    assert list(env.km.passphrases) == [secret_uuid]
    assert domain.get_tpm(env.dom(inst).xml) == ("2.0", "tpm-crb", secret_uuid)
    assert custody_free(record.get_server_record(env.dom(inst).xml).system_metadata) == {
        "vtpm_secret_uuid": secret_uuid}


def test_f4_vtpm_removed_deletes_the_secret_on_confirm_only(env: Env) -> None:
    inst = env.spawn(env.instance("host"))
    ek = env.state_file(inst).read_bytes()
    resize_to(env, inst, {}, revert=True)
    assert env.state_file(inst).read_bytes() == ek
    assert len(env.km.passphrases) == 1 and len(env.conn.secrets) == 1
    new = Flavor(extra_specs={})
    inst.new_flavor = new
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    assert len(env.km.passphrases) == 1, "kept until confirm"
    with pytest.raises(exception.VTPMSecretForbidden):
        env.drv.confirm_migration(MEMBER, None, inst, None)
    assert (env.tmp / "resize" / inst.uuid).exists(), "a refused confirm changes nothing"
    env.drv.confirm_migration(OWNER, None, inst, None)
    assert env.km.passphrases == {} and env.conn.secrets == {}
    assert custody_free(record.get_server_record(env.dom(inst).xml).system_metadata) == {}
    assert not (env.state_base / inst.uuid).exists()
    assert not (env.tmp / "resize" / inst.uuid).exists()


def test_resize_between_user_and_host_moves_the_libvirt_secret(env: Env) -> None:
    inst = env.spawn(env.instance("user"))
    resize_to(env, inst, {"hw:tpm_version": "2.0", "hw:tpm_secret_security": "host"})
    assert [s.private for s in env.conn.secrets.values()] == [False]
    resize_to(env, inst, {"hw:tpm_version": "2.0", "hw:tpm_secret_security": "user"})
    assert env.conn.secrets == {} and env.dom(inst).active


@pytest.mark.parametrize(("old", "new"), [("user", "deployment"), ("deployment", "host")])
def test_resize_to_or_from_deployment_is_refused_before_anything(env: Env, old, new) -> None:
    inst = env.spawn(env.instance(old))
    env.reset()
    flavor = Flavor(extra_specs={"hw:tpm_version": "2.0",
                                         "hw:tpm_secret_security": new})
    with pytest.raises(exception.OperationNotSupportedForVTPM, match="change owner"):
        env.drv.migrate_disk_and_power_off(OWNER, inst, None, flavor, None)
    assert env.events == [] and env.dom(inst).active


def test_resize_refusals(env: Env) -> None:
    inst = env.spawn(env.instance())
    flavor = Flavor(extra_specs={"hw:tpm_version": "2.0"})
    with pytest.raises(exception.VTPMError, match="only resizes on this host"):
        env.drv.migrate_disk_and_power_off(OWNER, inst, "compute-2", flavor, None)
    with pytest.raises(exception.InvalidVTPMConfig):
        env.drv.migrate_disk_and_power_off(
            OWNER, inst, None, Flavor(extra_specs={"hw:tpm_version": "3"}), None)
    assert env.dom(inst).active
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, flavor, None)
    with pytest.raises(exception.VTPMError, match="already in progress"):
        env.drv.migrate_disk_and_power_off(OWNER, inst, None, flavor, None)


def test_failed_finish_deletes_the_secret_it_created(env: Env) -> None:
    # Issue 13 item 2: the failed step used to delete the new secret but leave the
    # domain naming it, with the resize pending (confirm offered, every start failing).
    inst = servers.new_instance("plain", OWNER, kernel=KERNEL)
    env.spawn(inst)
    new = Flavor(extra_specs={"hw:tpm_version": "2.0"})
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.conn.fail_start = True
    with pytest.raises(exception.VirtError, match="the resize was rolled back"):
        env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    assert env.km.passphrases == {} and env.conn.secrets == {}
    stored = record.get_server_record(env.dom(inst).xml)
    assert custody_free(stored.system_metadata) == {}, "no record names the deleted secret"
    assert stored.flavor.extra_specs == {}
    assert domain.get_tpm(env.dom(inst).xml) is None
    assert not env.drv.resize_ops.has_backup(inst.uuid), "no confirm to offer"
    env.conn.fail_start = False
    found = servers.find(env.conn, "plain")
    env.drv.power_on(OWNER, found, None)
    assert env.dom(inst).active


def test_standalone_revert_without_old_flavor_uses_the_stash(env: Env) -> None:
    inst = env.spawn(env.instance())
    ek = env.state_file(inst).read_bytes()
    new = Flavor(extra_specs={"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"})
    env.drv.migrate_disk_and_power_off(OWNER, inst, None, new, None)
    inst.flavor = new
    env.drv.finish_migration(OWNER, None, inst, "[]", None, None, True, {})
    found = servers.find(env.conn, "vm1")  # a new process: no old/new flavor known
    env.drv.finish_revert_migration(OWNER, found, None, None)
    assert env.state_file(inst).read_bytes() == ek
    assert domain.get_tpm(env.dom(inst).xml)[1] == "tpm-tis"


def test_copy_tree_preserving_keeps_modes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "tpm2").mkdir(parents=True, mode=0o700)
    (src / "tpm2" / "f").write_bytes(b"x")
    (src / "tpm2" / "f").chmod(0o600)
    backup.copy_tree_preserving(src, tmp_path / "dst")
    assert stat.S_IMODE((tmp_path / "dst" / "tpm2").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "dst" / "tpm2" / "f").stat().st_mode) == 0o600
    assert (tmp_path / "dst" / "tpm2" / "f").read_bytes() == b"x"


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_copy_tree_preserving_refuses_anything_but_files_and_directories(
        tmp_path: Path, planted: str) -> None:
    src = tmp_path / "src"
    (src / "tpm2").mkdir(parents=True, mode=0o700)
    (src / "tpm2" / "f").write_bytes(b"x")
    bad = src / "tpm2" / "extra"
    if planted == "symlink":
        bad.symlink_to("/etc/shadow")
    else:
        os.mkfifo(bad)
    with pytest.raises(exception.UnsafeStatePath, match=str(bad)):
        backup.copy_tree_preserving(src, tmp_path / "dst")
    assert not (tmp_path / "dst" / "tpm2" / "extra").exists()
