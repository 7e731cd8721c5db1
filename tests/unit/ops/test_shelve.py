"""ops.shelve and ops.rebuild on the fake libvirt: the TPM state leaves and comes back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.conftest import MEMBER, OWNER, Env
from vtpm_driver import exception, policy
from vtpm_driver.ops.rebuild import RebuildOps
from vtpm_driver.ops.shelve import OffHostOps, Site
from vtpm_driver.statestore import DirectoryStateStore


def assert_host_free(env: Env, inst) -> None:
    """No domain, TPM state or libvirt secret of the server (Barbican keeps its secret)."""
    assert inst.uuid not in env.conn.domains
    assert not (env.state_base / inst.uuid).exists()
    assert env.conn.secrets == {}
    assert inst.vtpm_secret_uuid in env.km.passphrases


@pytest.fixture
def offhost(env: Env) -> tuple[OffHostOps, Site]:
    store = DirectoryStateStore(env.tmp / "store")
    return OffHostOps(store, now=lambda: 1000.0), Site("h1", env.drv.guests,
                                                       str(env.state_base))


def test_shelve_stores_encrypted_state_then_frees_the_host(env: Env, offhost) -> None:
    ops, site = offhost
    inst = env.spawn(env.instance("host"))
    ek = env.state_file(inst).read_bytes()
    meta = ops.shelve(OWNER, site, inst)
    assert meta.shelved and meta.encrypted and meta.header_flags == 0x09
    assert meta.size == len(ek) and meta.source_host == "h1"
    assert_host_free(env, inst)
    copy = env.tmp / "store" / inst.uuid
    assert (copy / "swtpm" / "tpm2" / "tpm2-00.permall").read_bytes() == ek
    assert json.loads((copy / "meta.json").read_text())["reason"] == "shelve"

    back = ops.unshelve(OWNER, site, inst.uuid, keep_copy=False)
    assert back.uuid == inst.uuid and env.dom(back).active
    assert env.state_file(back).read_bytes() == ek, "same TPM, not a new one"
    assert not copy.exists()
    assert env.conn.secrets and all(not s.private for s in env.conn.secrets.values())


def test_non_owner_shelve_in_user_mode_touches_nothing(env: Env, offhost) -> None:
    ops, site = offhost
    inst = env.spawn(env.instance("user"))
    env.reset()
    with pytest.raises(exception.VTPMSecretForbidden, match="only its owner"):
        ops.shelve(MEMBER, site, inst)
    assert env.names() == [] and env.dom(inst).active
    assert ops.store.list() == []


def test_failed_unshelve_keeps_the_copy_and_leaves_nothing(env: Env, offhost) -> None:
    ops, site = offhost
    inst = env.spawn(env.instance("user"))
    ops.shelve(OWNER, site, inst)
    with pytest.raises(exception.VTPMSecretForbidden):
        ops.unshelve(MEMBER, site, inst.uuid, keep_copy=False)
    assert_host_free(env, inst)
    assert ops.store.get(inst.uuid).shelved


def test_evacuate_refuses_without_copy_or_stale_copy(env: Env, offhost) -> None:
    ops, site = offhost
    inst = env.spawn(env.instance("deployment"))
    with pytest.raises(exception.OperationNotSupportedForVTPM, match=r"state_backup = off"):
        ops.evacuate(OWNER, site, inst.uuid, allow_stale=False, mode="off", label="x")
    ops.backup(site, inst, "periodic")  # taken while running: stale by definition
    with pytest.raises(exception.OperationNotSupportedForVTPM,
                       match="allow_stale_tpm_state"):
        ops.evacuate(OWNER, site, inst.uuid, allow_stale=False, mode="periodic", label="x")


def test_mark_started_makes_a_stop_copy_stale(env: Env, offhost) -> None:
    ops, site = offhost
    inst = env.spawn(env.instance("host"))
    env.drv.power_off(inst)
    assert policy.copy_is_current(ops.backup(site, inst, "stop"))
    ops.mark_started(inst.uuid)
    assert not policy.copy_is_current(ops.store.get(inst.uuid))


def test_rebuild_keeps_the_tpm_and_reset_makes_a_new_one(env: Env) -> None:
    inst = env.spawn(env.instance("user"))
    ek = env.state_file(inst).read_bytes()
    ops = RebuildOps(env.drv.guests)
    assert ops.rebuild(OWNER, inst, cmdline="console=ttyS0 new=1") is False
    assert env.state_file(inst).read_bytes() == ek
    assert "new=1" in env.dom(inst).xml
    assert ops.rebuild(OWNER, inst, reset_tpm=True) is True
    assert env.state_file(inst).read_bytes() != ek
    assert env.dom(inst).active


def test_rescue_boots_another_cmdline_with_the_same_tpm(env: Env) -> None:
    inst = env.spawn(env.instance("user"))
    ek = env.state_file(inst).read_bytes()
    ops = RebuildOps(env.drv.guests)
    with pytest.raises(exception.VTPMSecretForbidden):
        ops.rescue(MEMBER, inst)
    assert not policy.is_rescued(inst)
    ops.rescue(OWNER, inst)
    assert policy.RESCUE_CMDLINE in env.dom(inst).xml and policy.is_rescued(inst)
    assert env.state_file(inst).read_bytes() == ek
    with pytest.raises(exception.VTPMError, match="rescue mode already"):
        ops.rescue(OWNER, inst)
    ops.unrescue(OWNER, inst)
    assert policy.RESCUE_CMDLINE not in env.dom(inst).xml and not policy.is_rescued(inst)
    assert env.state_file(inst).read_bytes() == ek


def test_store_refuses_unencrypted_state(env: Env, offhost, tmp_path: Path) -> None:
    ops, site = offhost
    inst = env.spawn(env.instance("host"))
    env.state_file(inst).write_bytes(b"\x02\x01\x00\x0a\x00\x00" + b"\0" * 8)
    with pytest.raises(exception.VTPMError, match="not say it is encrypted"):
        ops.backup(site, inst, "manual")
    assert ops.store.list() == [] and ops.store.temporaries() == []
