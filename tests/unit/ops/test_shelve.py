"""ops.shelve (off-host copies) and ops.rebuild on the fake libvirt."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.conftest import MEMBER, OWNER, Env
from vtpm_driver import exception
from vtpm_driver.model import rules
from vtpm_driver.model.server import is_rescued
from vtpm_driver.ops.rebuild import RebuildOps
from vtpm_driver.ops.shelve import OffHostOps, Site
from vtpm_driver.statestore import DirectoryStateStore
from vtpm_driver.virt import record


@pytest.fixture
def offhost(env: Env) -> tuple[OffHostOps, Site]:
    store = DirectoryStateStore(env.tmp / "store")
    return OffHostOps(store, now=lambda: 1000.0), Site("h1", env.drv.guests,
                                                       str(env.state_base))


def test_evacuation_copy_refuses_without_copy_or_stale_copy(env: Env, offhost) -> None:
    ops, site = offhost
    inst = env.spawn(env.instance("deployment"))
    with pytest.raises(exception.OperationNotSupportedForVTPM, match=r"state_backup = off"):
        ops.evacuation_copy(inst.uuid, label="x", host="h1", mode="off", allow_stale=False)
    ops.backup(site, inst, "periodic")  # taken while running: stale by definition
    with pytest.raises(exception.OperationNotSupportedForVTPM,
                       match="allow_stale_tpm_state"):
        ops.evacuation_copy(inst.uuid, label="x", host="h1", mode="periodic",
                            allow_stale=False)
    meta, described = ops.evacuation_copy(inst.uuid, label="x", host="h1", mode="periodic",
                                          allow_stale=True)
    assert meta.source_host == "h1" and "STALE" in described


def test_mark_started_makes_a_stop_copy_stale(env: Env, offhost) -> None:
    ops, site = offhost
    inst = env.spawn(env.instance("host"))
    env.drv.power_off(inst)
    assert rules.copy_is_current(ops.backup(site, inst, "stop"))
    ops.mark_started(inst.uuid)
    assert not rules.copy_is_current(ops.store.get(inst.uuid))


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


def test_reset_with_the_deployment_ca_publishes_the_new_tpms_certificate(env: Env,
                                                                        ek_ca) -> None:
    inst = env.spawn(env.instance("user"))
    (old_uuid,) = env.km.ek_certificates
    old_fingerprint = inst.system_metadata["vtpm_ek_fingerprint"]
    assert RebuildOps(env.drv.guests).rebuild(OWNER, inst, reset_tpm=True) is True
    (new_uuid,) = env.km.ek_certificates  # the old one withdrawn
    assert new_uuid != old_uuid
    stored = record.get_server_record(env.dom(inst).xml).system_metadata
    assert stored["vtpm_ek_certificate_uuid"] == new_uuid
    assert stored["vtpm_ek_fingerprint"] not in (None, old_fingerprint)
    assert env.dom(inst).active


def test_rescue_boots_another_cmdline_with_the_same_tpm(env: Env) -> None:
    inst = env.spawn(env.instance("user"))
    ek = env.state_file(inst).read_bytes()
    ops = RebuildOps(env.drv.guests)
    with pytest.raises(exception.VTPMSecretForbidden):
        ops.rescue(MEMBER, inst)
    assert not is_rescued(inst)
    ops.rescue(OWNER, inst)
    assert rules.RESCUE_CMDLINE in env.dom(inst).xml and is_rescued(inst)
    assert env.state_file(inst).read_bytes() == ek
    with pytest.raises(exception.VTPMError, match="rescue mode already"):
        ops.rescue(OWNER, inst)
    ops.unrescue(OWNER, inst)
    assert rules.RESCUE_CMDLINE not in env.dom(inst).xml and not is_rescued(inst)
    assert env.state_file(inst).read_bytes() == ek


def test_store_refuses_unencrypted_state(env: Env, offhost, tmp_path: Path) -> None:
    ops, site = offhost
    inst = env.spawn(env.instance("host"))
    env.state_file(inst).write_bytes(b"\x02\x01\x00\x0a\x00\x00" + b"\0" * 8)
    with pytest.raises(exception.VTPMError, match="not say it is encrypted"):
        ops.backup(site, inst, "manual")
    assert ops.store.list() == [] and ops.store.temporaries() == []
