"""ops.lifecycle through VTPMDriver: spawn and delete (SPEC E, F1, F3, G1, G3)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.fakes.swtpm import custody_free
from tests.unit.conftest import (
    KERNEL,
    MEMBER,
    OWNER,
    Env,
    dataclasses_replace,
    resize_to,
    touch_console,
)
from vtpm_driver import exception
from vtpm_driver.model import request
from vtpm_driver.ops import secrets as ops_secrets
from vtpm_driver.standalone import servers
from vtpm_driver.virt import domain, record

# --------------------------------------------------------------------------- spawn


@pytest.mark.parametrize("mode", request.SECRET_SECURITY_MODES)
def test_spawn_defines_tpm_and_record_and_starts_with_the_secret(env: Env, mode: str) -> None:
    inst = env.spawn(env.instance(mode))
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]

    # The start that puts the passphrase in libvirt is journalled around it (issue 13).
    assert env.names() == ["barbican.create", "virt.define", "virt.setmetadata",
                           "virt.secret.define", "virt.start", "virt.setmetadata"]
    xml = env.dom(inst).xml
    assert domain.get_tpm(xml) == ("2.0", "tpm-tis", secret_uuid)
    stored = record.get_server_record(xml)
    assert stored == dataclasses_replace(inst)
    assert custody_free(stored.system_metadata) == {"vtpm_secret_uuid": secret_uuid}
    assert env.km.passphrases[secret_uuid] not in xml
    # E1/E3: private + ephemeral and gone after the start, except in host mode.
    assert env.conn.started_with == [(secret_uuid, mode != "host")]
    if mode == "host":
        assert list(env.conn.secrets) == [secret_uuid]
        assert env.conn.secrets[secret_uuid].private is False
    else:
        assert env.conn.secrets == {}
        assert ("undefine", secret_uuid) in env.conn.calls
    assert env.state_file(inst).exists()
    assert env.drv.get_info(inst) == "running"
    assert env.drv.list_instances() == ["vm1"]
    assert inst.console_log == str(env.tmp / "console" / f"{inst.uuid}.log")


def test_spawn_from_image_properties(env: Env) -> None:
    inst = servers.new_instance(
        "img", OWNER, image_properties={"hw_tpm_version": "2.0", "hw_tpm_model": "tpm-crb"},
        kernel=KERNEL)
    env.spawn(inst)
    assert domain.get_tpm(env.dom(inst).xml)[:2] == ("2.0", "tpm-crb")
    assert record.get_server_record(env.dom(inst).xml).image_meta.properties == {
        "hw_tpm_version": "2.0", "hw_tpm_model": "tpm-crb"}


def test_spawn_without_vtpm_touches_no_secret(env: Env) -> None:
    inst = servers.new_instance("plain", OWNER, kernel=KERNEL)
    env.spawn(inst)
    assert env.names() == ["virt.define", "virt.start"]
    assert domain.get_tpm(env.dom(inst).xml) is None
    env.drv.destroy(OWNER, inst)
    assert env.conn.domains == {}


def test_spawn_power_on_false_defines_only(env: Env) -> None:
    inst = env.spawn(env.instance(), power_on=False)
    assert env.names() == ["barbican.create", "virt.define"]
    assert env.drv.get_info(inst) == "shutdown"
    env.reset()
    env.drv.power_on(OWNER, inst, None)
    assert env.names()[:1] == ["barbican.get"]
    assert env.drv.get_info(inst) == "running"


@pytest.mark.parametrize(("change", "error", "needle"), [
    ({"hw:tpm_model": "tpm-crb", "hw:tpm_version": "1.2"}, exception.InvalidVTPMConfig,
     "tpm-crb"),
    ({"hw:tpm_secret_security": "nobody"}, exception.InvalidVTPMConfig, "'nobody'"),
])
def test_spawn_refuses_invalid_requests_before_anything(env, change, error, needle) -> None:
    inst = env.instance()
    inst.flavor.extra_specs.update(change)
    with pytest.raises(error, match=needle):
        env.spawn(inst)
    assert env.events == [] and env.conn.domains == {}


def test_spawn_refuses_what_the_host_lacks_before_anything(env: Env) -> None:
    env.drv.conf.set_override("supported_tpm_secret_security", ["user"], group="libvirt")
    with pytest.raises(exception.InvalidConfiguration) as err:
        env.spawn(env.instance("host"))
    assert "COMPUTE_SECURITY_TPM_SECRET_SECURITY_HOST" in str(err.value)
    assert env.events == []


def test_spawn_refuses_when_swtpm_is_disabled(tmp_path: Path, env: Env) -> None:
    env.drv.conf.set_override("swtpm_enabled", False, group="libvirt")
    with pytest.raises(exception.InvalidConfiguration, match="swtpm_enabled is False"):
        env.spawn(env.instance())
    assert env.events == []


def test_spawn_refuses_bad_boot_files_and_clashes_before_anything(env: Env) -> None:
    inst = env.instance()
    inst.image_meta.kernel = "relative/vmlinuz"
    with pytest.raises(exception.VirtError, match="must be absolute"):
        env.spawn(inst)
    first = env.spawn(env.instance(name="taken"))
    env.reset()
    with pytest.raises(exception.InstanceExists, match="'taken'"):
        env.spawn(env.instance(name="taken"))
    stale = env.instance(name="stale")
    (env.state_base / stale.uuid).mkdir()
    with pytest.raises(exception.VTPMError, match="already exists with no server"):
        env.spawn(stale)
    assert env.events == []
    assert list(env.conn.domains) == [first.uuid]


def _fail_barbican_create(env: Env) -> None:
    env.km.fail["create"] = exception.KeyManagerUnavailable("cannot reach Barbican")


def _fail_define(env: Env) -> None:
    env.conn.fail_define = True


def _fail_secret_define(env: Env) -> None:
    env.conn.fail_secret_define = True


def _fail_set_value(env: Env) -> None:
    env.conn.fail_set_value = True


def _fail_start(env: Env) -> None:
    env.conn.fail_start = True


def _guest_never_runs(env: Env) -> None:
    env.conn.stuck_after_start = True


FAULTS = [
    pytest.param(_fail_barbican_create, exception.KeyManagerUnavailable, id="barbican"),
    pytest.param(_fail_define, exception.VirtError, id="define"),
    pytest.param(_fail_secret_define, exception.VirtError, id="secret-define"),
    pytest.param(_fail_set_value, exception.VirtError, id="secret-value"),
    pytest.param(_fail_start, exception.VirtError, id="start"),
    pytest.param(_guest_never_runs, exception.VirtError, id="not-running"),
]


@pytest.mark.parametrize("mode", ["user", "host"])
@pytest.mark.parametrize(("fault", "error"), FAULTS)
def test_g3_failed_spawn_leaves_nothing_and_retry_works(env: Env, fault, error,
                                                        mode: str) -> None:
    inst = env.current = env.instance(mode)
    fault(env)
    foreign = dict(env.conn.secrets)
    with pytest.raises(error) as err:
        env.spawn(inst)
    message = str(err.value)
    assert message.startswith(f"cannot spawn server 'vm1' ({inst.uuid}): ")
    assert message.endswith("(everything it had created was removed)")
    assert inst.uuid not in env.conn.domains
    assert not (env.state_base / inst.uuid).exists()
    assert env.conn.secrets == foreign
    assert env.km.passphrases == {}
    assert "vtpm_secret_uuid" not in inst.system_metadata
    assert not Path(inst.console_log).exists()

    # Fix the fault, retry with the same server: it works.
    env.km.fail.clear()
    env.conn.fail_define = env.conn.fail_set_value = env.conn.fail_start = False
    env.conn.fail_secret_define = False
    env.conn.stuck_after_start = False
    env.conn.secrets.clear()
    env.spawn(inst)
    assert env.drv.get_info(inst) == "running"


def test_g5_leftover_libvirt_secret_of_the_server_is_replaced(env: Env) -> None:
    # e.g. an operation killed between define and undefine left it behind.
    inst = env.instance("user")
    leftover = "11111111-2222-4333-8444-555555555555"
    env.conn.secretDefineXML(
        f"<secret ephemeral='yes' private='yes'><uuid>{leftover}</uuid>"
        f"<usage type='vtpm'><name>{inst.uuid}</name></usage></secret>")
    env.spawn(inst)
    assert leftover not in env.conn.secrets
    assert env.drv.get_info(inst) == "running"


def test_host_mode_secret_of_the_server_already_on_the_host_is_reused_not_replaced(
        env: Env) -> None:
    """Defect 11: a host-mode secret the record does not name may encrypt the TPM state;
    it is reused and recorded (as Nova does), never undefined for a new passphrase."""
    inst = env.instance("host")
    hosts_own = "11111111-2222-4333-8444-555555555555"
    env.conn.secretDefineXML(
        f"<secret ephemeral='no' private='no'><uuid>{hosts_own}</uuid>"
        f"<usage type='vtpm'><name>{inst.uuid}</name></usage></secret>")
    # Nova names a host secret after its Barbican secret; the server's record lost it.
    env.km.passphrases[hosts_own] = "the passphrase of the existing state"
    env.conn.secrets[hosts_own].setValue(b"the passphrase of the existing state")
    env.spawn(inst)
    assert set(env.conn.secrets) == {hosts_own}
    assert inst.system_metadata["vtpm_secret_uuid"] == hosts_own
    assert list(env.km.passphrases) == [hosts_own]  # no new passphrase
    assert env.drv.get_info(inst) == "running"


def test_failed_spawn_never_removes_a_secret_that_is_not_its_own(env: Env) -> None:
    inst = env.instance()
    secret_uuid, _ = env.km.ensure_vtpm_secret(OWNER, inst, "user")  # recorded before
    env.conn.secretDefineXML(
        f"<secret><uuid>{secret_uuid}</uuid><usage type='volume'><volume>/x.img</volume>"
        "</usage></secret>")
    with pytest.raises(exception.VirtError, match="define libvirt vTPM secret") as err:
        env.spawn(inst)
    assert str(err.value).endswith("(everything it had created was removed)")
    assert env.conn.secrets[secret_uuid].usage_type == "volume"  # not ours: kept
    assert secret_uuid in env.km.passphrases  # not created by this spawn: kept
    assert inst.uuid not in env.conn.domains


def test_failed_cleanup_is_reported(env: Env) -> None:
    inst = env.instance()
    env.conn.fail_start = True
    env.km.fail["delete"] = exception.KeyManagerUnavailable("Barbican went away")
    with pytest.raises(exception.VirtError) as err:
        env.spawn(inst)
    assert "cleanup incomplete, remove by hand: Barbican secret" in str(err.value)
    assert "Barbican went away" in str(err.value)


# --------------------------------------------------------------------------- delete


def test_f3_destroy_removes_everything_and_is_idempotent(env: Env) -> None:
    inst = env.spawn(env.instance("host"))
    touch_console(inst)
    env.reset()
    env.drv.destroy(OWNER, inst)
    assert env.names()[:2] == ["barbican.delete", "virt.destroy"]
    env.assert_nothing_left(inst)
    env.reset()
    env.drv.destroy(OWNER, inst)  # second call: a no-op
    assert env.names() == []
    with pytest.raises(exception.InstanceNotFound):
        env.drv.get_info(inst)


def test_destroy_refused_by_barbican_touches_nothing(env: Env) -> None:
    inst = env.spawn(env.instance())
    env.reset()
    with pytest.raises(exception.VTPMSecretForbidden):
        env.drv.destroy(MEMBER, inst)
    assert env.names() == ["barbican.delete"]
    assert env.dom(inst).active and env.state_file(inst).exists()
    assert inst.system_metadata["vtpm_secret_uuid"] in env.km.passphrases


def test_destroy_keeping_secrets_or_disks(env: Env) -> None:
    inst = env.spawn(env.instance())
    secret_uuid = inst.system_metadata["vtpm_secret_uuid"]
    env.drv.destroy(OWNER, inst, destroy_disks=False)
    assert inst.uuid not in env.conn.domains
    assert env.state_file(inst).exists(), "KEEP_TPM"
    assert secret_uuid in env.km.passphrases

    other = env.spawn(env.instance(name="vm2"))
    env.drv.destroy(OWNER, other, destroy_secrets=False)
    assert not (env.state_base / other.uuid).exists()
    assert other.system_metadata["vtpm_secret_uuid"] in env.km.passphrases


def test_destroy_keeps_a_console_log_the_user_chose(env: Env) -> None:
    inst = env.instance()
    inst.console_log = str(env.tmp / "mine.log")
    env.spawn(inst)
    touch_console(inst)
    env.drv.destroy(OWNER, inst)
    assert Path(inst.console_log).exists()


# --------------------------------------------------------------------------- G1


def test_g1_no_passphrase_in_logs_errors_xml_or_reprs(env: Env,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    inst = env.spawn(env.instance())
    passphrase = env.km.passphrases[inst.system_metadata["vtpm_secret_uuid"]]
    env.drv.reboot(OWNER, inst, None, "HARD")
    env.drv.suspend(None, inst)
    env.drv.resume(OWNER, inst, None)
    resize_to(env, inst, {"hw:tpm_version": "1.2"}, revert=True)
    errors = []
    env.conn.fail_start = True
    for attempt in (lambda: env.drv.reboot(OWNER, inst, None, "HARD"),
                    lambda: env.spawn(env.instance(name="x"))):
        with pytest.raises(exception.VTPMError) as err:
            attempt()
        errors += [str(err.value), repr(err.value)]
    start = ops_secrets.StartSecret("u", passphrase, False)
    texts = [r.getMessage() for r in caplog.records] + [repr(r.args) for r in caplog.records]
    texts += [*errors, repr(start), repr(env.drv.guests), repr(env.drv.lifecycle),
              repr(env.drv.power), repr(env.drv.resize_ops), repr(inst)]
    texts += [d.xml for d in env.conn.domains.values()] + env.conn.defined_xml
    texts += [p.read_text(errors="replace") for p in (env.tmp / "console").glob("*")]
    assert len(caplog.records) > 10
    for text in texts:
        assert passphrase not in text and passphrase[:32] not in text
    assert "***" in repr(start)


# --------------------------------------------------------------------------- EK certificates


def test_spawn_with_the_deployment_ca_manufactures_publishes_and_delete_withdraws(
        env: Env, ek_ca) -> None:
    inst = env.spawn(env.instance())
    # The TPM is made before the domain is defined, so the record names its certificate.
    assert env.names()[:3] == ["barbican.create", "barbican.store_ek_certificate",
                               "virt.define"]
    sysmeta = record.get_server_record(env.dom(inst).xml).system_metadata
    (pem,) = env.km.ek_certificates.values()
    assert pem == sysmeta["vtpm_ek_certificate"] + ek_ca.chain_pem()
    assert len(sysmeta["vtpm_ek_fingerprint"]) == 64
    assert sysmeta["vtpm_ek_certificate_uuid"] in env.km.ek_certificates
    env.drv.destroy(OWNER, inst)
    assert env.km.ek_certificates == {}
    env.assert_nothing_left(inst)


def test_spawn_failing_to_publish_leaves_no_tpm_and_no_secret(env: Env, ek_ca) -> None:
    env.km.fail["store_ek_certificate"] = exception.KeyManagerUnavailable("Barbican down")
    inst = env.instance()
    with pytest.raises(exception.KeyManagerUnavailable, match="Barbican down"):
        env.spawn(inst)
    env.assert_nothing_left(inst)
    assert "vtpm_ek_fingerprint" not in inst.system_metadata
