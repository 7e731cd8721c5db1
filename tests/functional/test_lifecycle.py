"""VTPMDriver lifecycle on the real stack: libvirtd + QEMU (TCG) + swtpm + Keystone + Barbican.

The test guest prints ``VTPM_RESULT version=.. driver=.. getrandom_rc=.. ek=<sha256>`` at
each boot; ``ek`` identifies the TPM (same while its state lives, different for a fresh
TPM). Guests booted with ``vtpm_test=stay`` keep running so they can be rebooted,
stopped, suspended and resized; one server is shared by the steps of each scenario to
keep the number of boots (5-10 s each) modest.
"""

from __future__ import annotations

import logging
import uuid

import libvirt
import pytest

from tests.fakes.swtpm import custody_free
from tests.functional.fixtures_keymgr import AccessLogCounter
from tests.functional.fixtures_libvirt import SWTPM_STATE_ROOT, read_console
from tests.functional.fixtures_server import (
    Console,
    ServersOnStack,
    closed_port_url,
    driver_conf,
)
from vtpm_driver import exception
from vtpm_driver.driver import VTPMDriver
from vtpm_driver.guestreport import GuestTPM, tpm_of
from vtpm_driver.model import custody
from vtpm_driver.model.server import Flavor, Instance
from vtpm_driver.standalone import servers
from vtpm_driver.virt import domain, state
from vtpm_driver.virt import secret as virt_secret

# Each test looks at its own server only; the one that counts the shared Keystone's and
# Barbican's requests needs them to itself (marker "alone").
pytestmark = [pytest.mark.functional]

RESIZE_BACKUPS = "/var/lib/vtpm-driver/resize"


def check_result(result: dict[str, str], version: str, driver: str) -> GuestTPM:
    """The guest saw the TPM it asked for and it works; returns the TPM as the guest knows
    it (a TPM 2.0 guest sealed a value in it, or read back the one it sealed)."""
    assert result["version"] == ("2" if version == "2.0" else version)
    assert result["driver"] == driver
    assert result["getrandom_rc"] == "0"
    assert len(result["ek"]) == 64, result
    if version == "2.0":
        assert len(result["sealed"]) == 64 and len(result["pcr7"]) == 64, result
    return tpm_of(result)


def mark_settled(counter: AccessLogCounter) -> None:
    for service in counter.SERVICES:
        counter.entries(service)
    counter.mark()


# ------------------------------------------------------------------------ spawn + delete


@pytest.mark.parametrize(("flavor", "image", "version", "model"), [
    pytest.param({"hw:tpm_version": "1.2"}, {}, "1.2", "tpm-tis", id="1.2-tis"),
    pytest.param({"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-tis"}, {}, "2.0", "tpm-tis",
                 id="2.0-tis"),
    pytest.param({}, {"hw_tpm_version": "2.0", "hw_tpm_model": "tpm-crb"}, "2.0", "tpm-crb",
                 id="2.0-crb-image-properties"),
])
def test_spawn_and_destroy(servers_on_stack: ServersOnStack, caplog, flavor, image, version,
                           model) -> None:
    env = servers_on_stack
    caplog.set_level(logging.DEBUG)
    inst = env.new_server(flavor, image)
    console = env.spawn(inst)
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]
    passphrase = env.driver.key_manager.get_vtpm_secret(env.owner, inst)

    # F1: the guest sees the TPM it asked for; E3: no libvirt secret once it runs.
    check_result(console.wait_new(), version, model.replace("-", "_"))
    assert env.libvirt_secrets_of(inst) == []
    env.wait_shutoff(inst)  # the guest powers itself off after printing
    assert state.is_encrypted(state.state_file(SWTPM_STATE_ROOT, inst.uuid, version))
    # E2 + the record: libvirt is the only store.
    assert domain.get_tpm(env.domain(inst).XMLDesc(0)) == (version, model, secret_uuid)
    found = servers.find(env.conn, inst.name)
    assert (found.uuid, custody_free(found.system_metadata)) == (
        inst.uuid, {"vtpm_secret_uuid": secret_uuid})
    assert found.system_metadata[custody.GENERATION_KEY] == "1"  # its first, current copy
    assert (found.flavor.extra_specs, found.image_meta.properties) == (flavor, image)
    assert env.barbican_status(secret_uuid) == 200
    # G1: the passphrase is nowhere but in Barbican.
    seen = [env.domain(inst).XMLDesc(0), read_console(console.path)]
    seen += [r.getMessage() for r in caplog.records] + [repr(r.args) for r in caplog.records]
    assert len(passphrase) == 512 and all(passphrase[:32] not in text for text in seen)

    # F3: delete removes everything; a second delete is a no-op.
    env.driver.destroy(env.owner, inst)
    env.assert_nothing_left(inst, secret_uuid)
    env.driver.destroy(env.owner, inst)


@pytest.mark.alone
def test_host_mode_secret_persists_and_restarts_need_no_barbican(
        servers_on_stack: ServersOnStack, access_log_counter: AccessLogCounter) -> None:
    env = servers_on_stack
    inst = env.new_server({"hw:tpm_version": "2.0", "hw:tpm_secret_security": "host"})
    console = env.spawn(inst)
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]
    ek = check_result(console.wait_new(), "2.0", "tpm_tis")
    env.wait_shutoff(inst)
    assert [(s.uuid, s.ephemeral, s.private) for s in env.libvirt_secrets_of(inst)] == [
        (secret_uuid, False, False)]

    # Another project member starts it: the host's secret suffices, Barbican is not asked.
    mark_settled(access_log_counter)
    console.mark()
    env.driver.power_on(env.contexts["member"], inst, None)
    assert check_result(console.wait_new(), "2.0", "tpm_tis") == ek
    # (filtered by the secret: other suites may share the stack)
    assert access_log_counter.barbican(path=secret_uuid) == 0
    assert len(env.libvirt_secrets_of(inst)) == 1

    env.driver.destroy(env.owner, inst)
    env.assert_nothing_left(inst, secret_uuid)


def test_deployment_mode_secret_belongs_to_the_service_user(
        servers_on_stack: ServersOnStack) -> None:
    env = servers_on_stack
    inst = env.new_server({"hw:tpm_version": "2.0", "hw:tpm_secret_security": "deployment"})
    console = env.spawn(inst)
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]
    check_result(console.wait_new(), "2.0", "tpm_tis")
    assert env.libvirt_secrets_of(inst) == []
    meta = env.service.get(f"{env.stack.barbican_url}/v1/secrets/{secret_uuid}",
                           headers={"Accept": "application/json"}).json()
    assert meta["creator_id"] == env.service.get_user_id()
    env.driver.destroy(env.contexts["member"], inst)  # the service user deletes it
    env.assert_nothing_left(inst, secret_uuid)


# ------------------------------------------------------------------------ F2, F5


def test_tpm_state_survives_reboots_stop_start_and_suspend(
        servers_on_stack: ServersOnStack) -> None:
    env = servers_on_stack
    owner, member = env.owner, env.contexts["member"]
    inst = env.new_server({"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}, stay=True)
    console = env.spawn(inst)
    ek = check_result(console.wait_new(), "2.0", "tpm_crb")

    def boots_with_same_tpm(operation) -> None:
        console.mark()
        operation()
        assert check_result(console.wait_new(), "2.0", "tpm_crb") == ek
        assert env.driver.get_info(inst) == "running"
        assert env.libvirt_secrets_of(inst) == [], "no vtpm secret left after a start"

    boots_with_same_tpm(lambda: env.driver.reboot(owner, inst, None, "SOFT"))
    boots_with_same_tpm(lambda: env.driver.reboot(owner, inst, None, "HARD"))

    env.driver.power_off(inst, timeout=60, retry_interval=5)  # ACPI: the guest obeys
    assert env.driver.get_info(inst) == "shutdown"
    boots_with_same_tpm(lambda: env.driver.power_on(owner, inst, None))

    env.driver.suspend(owner, inst)
    assert env.driver.get_info(inst) == "suspended"
    env.driver.resume(owner, inst, None)
    assert env.driver.get_info(inst) == "running"
    # The restored guest did not reboot; a soft reboot shows its TPM state came back.
    boots_with_same_tpm(lambda: env.driver.reboot(owner, inst, None, "SOFT"))

    # F5: the owner's project colleague may not read the passphrase: refused, untouched.
    domain_id = env.domain(inst).ID()
    with pytest.raises(exception.VTPMSecretForbidden, match="owner"):
        env.driver.reboot(member, inst, None, "HARD")
    assert env.driver.get_info(inst) == "running"
    assert env.domain(inst).ID() == domain_id, "the guest was not restarted"
    boots_with_same_tpm(lambda: env.driver.reboot(owner, inst, None, "HARD"))

    env.driver.destroy(owner, inst)
    env.assert_nothing_left(inst, None)


# ------------------------------------------------------------------------ F4


def resize(env: ServersOnStack, inst: Instance, extra_specs: dict[str, str],
           memory_mb: int = 256) -> None:
    """Nova's compute manager around migrate_disk_and_power_off + finish_migration."""
    new = Flavor(vcpus=1, memory_mb=memory_mb, extra_specs=extra_specs)
    inst.new_flavor = new
    env.driver.migrate_disk_and_power_off(env.owner, inst, None, new, None, timeout=60,
                                          retry_interval=5)
    inst.old_flavor, inst.flavor = inst.flavor, new
    env.driver.finish_migration(env.owner, None, inst, "[]", None, inst.image_meta, True, {})


def confirm(env: ServersOnStack, inst: Instance) -> None:
    env.driver.confirm_migration(env.owner, None, inst, None)
    inst.old_flavor = inst.new_flavor = None


def revert(env: ServersOnStack, inst: Instance) -> None:
    inst.flavor = inst.old_flavor
    env.driver.finish_revert_migration(env.owner, inst, None, None)
    inst.old_flavor = inst.new_flavor = None


def test_resize_keeps_changes_reverts_and_removes_the_tpm(
        servers_on_stack: ServersOnStack) -> None:
    env = servers_on_stack
    inst = env.new_server({"hw:tpm_version": "2.0"}, stay=True)
    console = env.spawn(inst)
    ek = check_result(console.wait_new(), "2.0", "tpm_tis")
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]

    # Same TPM config, more memory: same TPM.
    console.mark()
    resize(env, inst, {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-tis"}, memory_mb=320)
    assert check_result(console.wait_new(), "2.0", "tpm_tis") == ek
    confirm(env, inst)
    assert servers.find(env.conn, inst.uuid).flavor.memory_mb == 320

    # 2.0 -> 1.2: a fresh TPM (the old one waits in the backup, outside libvirt's dir).
    console.mark()
    resize(env, inst, {"hw:tpm_version": "1.2"})
    ek_12 = check_result(console.wait_new(), "1.2", "tpm_tis")
    assert ek_12 != ek
    assert inst.system_metadata["vtpm_secret_uuid"] == secret_uuid  # as Nova: same secret
    backup = f"{RESIZE_BACKUPS}/{inst.uuid}/swtpm/tpm2/tpm2-00.permall"
    assert state.is_encrypted(backup)

    # Revert: the original TPM is back.
    console.mark()
    revert(env, inst)
    assert check_result(console.wait_new(), "2.0", "tpm_tis") == ek
    assert domain.get_tpm(env.domain(inst).XMLDesc(0)) == ("2.0", "tpm-tis", secret_uuid)
    assert not state.state_file(SWTPM_STATE_ROOT, inst.uuid, "1.2").exists()

    # vTPM removed: the guest has none; the secret goes on confirm.
    console.mark()
    resize(env, inst, {})
    assert console.wait_new()["version"] == "none"
    assert env.barbican_status(secret_uuid) == 200, "kept until confirm"
    confirm(env, inst)
    assert env.barbican_status(secret_uuid) == 404
    assert "vtpm_secret_uuid" not in servers.find(env.conn, inst.uuid).system_metadata
    assert not (SWTPM_STATE_ROOT / inst.uuid).exists()

    env.driver.destroy(env.owner, inst)
    env.assert_nothing_left(inst, secret_uuid)


# ------------------------------------------------------------------------ G3


def test_spawn_with_barbican_down_creates_nothing_and_retry_works(
        servers_on_stack: ServersOnStack, clouds, tmp_path) -> None:
    env = servers_on_stack
    broken = VTPMDriver(driver_conf(env.stack, clouds["service"], tmp_path / "console",
                                    barbican_endpoint=closed_port_url()))
    inst = env.new_server({"hw:tpm_version": "2.0"})
    with pytest.raises(exception.KeyManagerUnavailable) as err:
        env.spawn(inst, driver=broken)
    assert "cannot reach Barbican" in str(err.value)
    assert "everything it had created was removed" in str(err.value)
    env.assert_nothing_left(inst, None)
    broken.hypervisor.close()

    console = env.spawn(inst)
    check_result(console.wait_new(), "2.0", "tpm_tis")


def test_spawn_failing_at_the_libvirt_secret_leaves_nothing(
        servers_on_stack: ServersOnStack) -> None:
    env = servers_on_stack
    inst = env.new_server({"hw:tpm_version": "2.0"})
    # The Barbican secret exists already (recorded), and libvirt holds a secret of
    # another kind with its UUID: libvirt refuses to define our vtpm secret.
    secret_uuid, _ = env.driver.key_manager.ensure_vtpm_secret(env.owner, inst, "user")
    blocker = env.conn.secretDefineXML(
        f"<secret ephemeral='yes' private='yes'><uuid>{secret_uuid}</uuid>"
        f"<usage type='volume'><volume>/nonexistent/{inst.uuid}.img</volume></usage></secret>")
    try:
        with pytest.raises(exception.VirtError) as err:
            env.spawn(inst)
        assert "define libvirt vTPM secret" in str(err.value)
        assert str(err.value).endswith("(everything it had created was removed)")
        with pytest.raises(libvirt.libvirtError):
            env.domain(inst)
        assert not (SWTPM_STATE_ROOT / inst.uuid).exists()
        assert env.libvirt_secrets_of(inst) == []
        # Not created by this spawn: the recorded Barbican secret is kept.
        assert env.barbican_secrets_of(inst) == [secret_uuid]
        assert inst.system_metadata["vtpm_secret_uuid"] == secret_uuid
    finally:
        blocker.undefine()
    console = env.spawn(inst)
    check_result(console.wait_new(), "2.0", "tpm_tis")
    assert env.libvirt_secrets_of(inst) == []


def test_g5_spawn_replaces_a_leftover_libvirt_secret_of_the_server(
        servers_on_stack: ServersOnStack) -> None:
    env = servers_on_stack
    inst = env.new_server({"hw:tpm_version": "2.0"})
    # e.g. an operation killed between define and undefine left it behind.
    leftover = env.conn.secretDefineXML(
        f"<secret ephemeral='yes' private='yes'><uuid>{uuid.uuid4()}</uuid>"
        f"<usage type='vtpm'><name>{inst.uuid}</name></usage></secret>")
    leftover_uuid = leftover.UUIDString()
    console = env.spawn(inst)
    check_result(console.wait_new(), "2.0", "tpm_tis")
    assert env.libvirt_secrets_of(inst) == []
    assert leftover_uuid not in [s.uuid for s in virt_secret.list_vtpm_secrets(env.conn)]


def test_spawn_failing_to_start_leaves_nothing_and_retry_works(
        servers_on_stack: ServersOnStack) -> None:
    env = servers_on_stack
    inst = env.new_server({"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"},
                          kernel=f"/nonexistent/{uuid.uuid4().hex}/vmlinuz")
    with pytest.raises(exception.VirtError) as err:
        env.spawn(inst)
    assert str(err.value).startswith(f"cannot spawn server {inst.name!r} ({inst.uuid}): start")
    env.assert_nothing_left(inst, None)

    inst.image_meta.kernel = str(env.guest.kernel)
    console = Console(inst.console_log)
    console.mark()
    env.driver.spawn(env.owner, inst, inst.image_meta, [], None, {})
    check_result(console.wait_new(), "2.0", "tpm_crb")
