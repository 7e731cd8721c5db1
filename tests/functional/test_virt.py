"""vtpm_driver.virt against the real libvirtd, QEMU and swtpm.

Secrets (E1, E3), domain XML built by ``virt.domain`` booting the test guest
with an encrypted vTPM (E2, F1), the server record surviving libvirt, and
undefine keeping or deleting the swtpm state. Everything created is
registered with the ``cleanup`` fixture before it is created.
"""

from __future__ import annotations

import secrets
import subprocess
import time
import uuid
from pathlib import Path

import libvirt
import pytest

from tests.functional.fixtures_libvirt import (
    LIBVIRT_URI,
    SWTPM_STATE_ROOT,
    Cleanup,
    TestGuest,
    last_vtpm_result,
    parse_vtpm_results,
    read_console,
)
from vtpm_driver import exception
from vtpm_driver.model.server import Flavor, ImageMeta, Instance
from vtpm_driver.ops import secrets as ops_secrets
from vtpm_driver.virt import connection, domain, domains, guest, record, secret, state

pytestmark = pytest.mark.functional

BOOT_TIMEOUT = 180.0  # a bound, not a speed check: the guest powers itself off


def _passphrase() -> str:
    return secrets.token_urlsafe(48)


def _for_start(conn: libvirt.virConnect, secret_uuid: str, dom_uuid: str, passphrase: str, *,
               persistent: bool):
    """ops.secrets.secret_for_start over the real libvirt (E3)."""
    server = Instance(name="x", uuid=dom_uuid, user_id="u", project_id="p")
    start = ops_secrets.StartSecret(secret_uuid, passphrase, persistent)
    return ops_secrets.secret_for_start(secret.LibvirtSecretStore(conn), server, start)


def _record(name: str, dom_uuid: str, secret_uuid: str, *, image_properties=None,
            system_metadata=None, kernel=None, initrd=None, cmdline=None, console_log=None,
            **kwargs: object) -> Instance:
    """The server model as stored in the domain's <metadata>."""
    values: dict[str, object] = {
        "name": name,
        "uuid": dom_uuid,
        "user_id": "u-" + uuid.uuid4().hex,
        "project_id": "p-" + uuid.uuid4().hex,
        "user_name": "alice",
        "project_name": "demo",
        "created_at": "2026-01-02T03:04:05+00:00",
        "console_log": console_log,
    }
    values.update(kwargs)
    return Instance(
        flavor=Flavor(extra_specs={"hw:tpm_version": "2.0"}),
        image_meta=ImageMeta(properties=dict(image_properties or {}), kernel=kernel,
                                     initrd=initrd, cmdline=cmdline),
        system_metadata=(dict(system_metadata) if system_metadata is not None
                         else {"vtpm_secret_uuid": secret_uuid}),
        **values,  # type: ignore[arg-type]
    )


def _vtpm_guest_xml(
    dom_uuid: str,
    secret_uuid: str,
    console_log: Path,
    *,
    kernel: str,
    initrd: str | None,
    cmdline: str | None = None,
    version: str = "2.0",
    model: str = "tpm-tis",
) -> tuple[str, Instance]:
    name = f"vtpm-virt-{dom_uuid[:8]}"
    xml = domain.guest_xml(
        name, dom_uuid, 1, 256, console_log=str(console_log), kernel=kernel,
        initrd=initrd, cmdline=cmdline,
    )
    xml = domain.add_tpm(xml, version, model, secret_uuid)
    server = _record(
        name, dom_uuid, secret_uuid, kernel=kernel, initrd=initrd, cmdline=cmdline,
        console_log=str(console_log),
    )
    return record.set_server_record(xml, server), server


def _wait_for_console(dom: libvirt.virDomain, console_log: Path, needle: str) -> str:
    """Console text once it contains ``needle`` (bounded; fails if the guest stops first)."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        text = read_console(console_log)
        if needle in text:
            return text
        if not guest.is_active(dom) or time.monotonic() > deadline:
            raise AssertionError(f"no {needle!r} on the console; it ends with:\n{text[-3000:]}")
        time.sleep(0.2)


# ------------------------------------------------------------------ connection


def test_connect_and_unreachable_uri() -> None:
    with connection.Hypervisor(LIBVIRT_URI) as hv:
        assert hv.conn is hv.conn
        assert hv.conn.getURI() == LIBVIRT_URI
    with pytest.raises(exception.HypervisorUnavailable) as info:
        connection.connect("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    assert "/nonexistent/libvirt-sock" in str(info.value)


# ------------------------------------------------------------------ secrets (E1)


def test_private_secret_value_cannot_be_read(
    libvirt_conn: libvirt.virConnect, cleanup: Cleanup
) -> None:
    secret_uuid = cleanup.secret(str(uuid.uuid4()))
    instance_uuid = str(uuid.uuid4())
    passphrase = _passphrase()

    secret.define_vtpm_secret(
        libvirt_conn, secret_uuid, instance_uuid, passphrase, persistent=False
    )

    found = secret.lookup_vtpm_secret(libvirt_conn, secret_uuid)
    assert found is not None
    assert passphrase not in found.XMLDesc(0)
    with pytest.raises(libvirt.libvirtError) as err:
        found.value()
    assert err.value.get_error_code() == libvirt.VIR_ERR_INVALID_SECRET
    virsh = subprocess.run(
        ["virsh", "-c", LIBVIRT_URI, "secret-get-value", secret_uuid],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert virsh.returncode != 0
    assert passphrase not in virsh.stdout + virsh.stderr
    assert "private" in virsh.stderr

    assert (secret_uuid, instance_uuid, True, True) in secret.list_vtpm_secrets(libvirt_conn)
    assert secret.lookup_vtpm_secret_by_instance(libvirt_conn, instance_uuid) is not None

    assert secret.undefine_vtpm_secret(libvirt_conn, secret_uuid) is True
    assert secret.undefine_vtpm_secret(libvirt_conn, secret_uuid) is False
    assert secret.lookup_vtpm_secret(libvirt_conn, secret_uuid) is None
    assert all(s.uuid != secret_uuid for s in secret.list_vtpm_secrets(libvirt_conn))


def test_host_mode_secret_is_persistent_and_readable_by_root(
    libvirt_conn: libvirt.virConnect, cleanup: Cleanup
) -> None:
    secret_uuid = cleanup.secret(str(uuid.uuid4()))
    instance_uuid = str(uuid.uuid4())
    passphrase = _passphrase()
    with _for_start(
        libvirt_conn, secret_uuid, instance_uuid, passphrase, persistent=True
    ):
        pass
    found = secret.lookup_vtpm_secret(libvirt_conn, secret_uuid)
    assert found is not None, "host-mode secret must outlive the start"
    assert found.value() == passphrase.encode()
    assert (secret_uuid, instance_uuid, False, False) in secret.list_vtpm_secrets(libvirt_conn)
    assert secret.undefine_vtpm_secret(libvirt_conn, secret_uuid) is True


def test_second_secret_for_same_instance_is_refused(
    libvirt_conn: libvirt.virConnect, cleanup: Cleanup
) -> None:
    first = cleanup.secret(str(uuid.uuid4()))
    second = cleanup.secret(str(uuid.uuid4()))
    instance_uuid = str(uuid.uuid4())
    secret.define_vtpm_secret(libvirt_conn, first, instance_uuid, _passphrase(), persistent=False)
    with pytest.raises(exception.VirtError) as info:
        secret.define_vtpm_secret(
            libvirt_conn, second, instance_uuid, _passphrase(), persistent=False
        )
    assert second in str(info.value)
    assert secret.lookup_vtpm_secret(libvirt_conn, second) is None
    assert secret.lookup_vtpm_secret(libvirt_conn, first) is not None


# ------------------------------------------------------------------ domains, no boot


def test_define_lookup_record_and_undefine(
    libvirt_conn: libvirt.virConnect, cleanup: Cleanup, tmp_path: Path
) -> None:
    dom_uuid = cleanup.domain(str(uuid.uuid4()))
    secret_uuid = str(uuid.uuid4())
    xml, _ = _vtpm_guest_xml(
        dom_uuid, secret_uuid, tmp_path / "console.log", kernel="/nonexistent/vmlinuz",
        initrd=None,
    )
    tricky = _record(
        f"vtpm-virt-{dom_uuid[:8]}", dom_uuid, secret_uuid,
        user_name="  spaced  ", project_name="tab\there\nnewline\r",
        image_properties={"hw_tpm_model": "tpm-crb", " odd key ": "\x01ctl", "ü": "漢字"},
        cmdline="",
    )
    xml = record.set_server_record(xml, tricky)

    dom = guest.define(libvirt_conn, xml)

    # libvirt keeps the device and the record exactly.
    live_xml = dom.XMLDesc(0)
    assert domain.get_tpm(live_xml) == ("2.0", "tpm-tis", secret_uuid)
    assert record.get_server_record(live_xml) == tricky
    assert record.record_from_domain(dom) == tricky

    updated = _record(tricky.name, dom_uuid, secret_uuid, system_metadata={})
    record.update_domain_record(dom, updated)
    assert record.record_from_domain(dom) == updated
    assert record.get_server_record(dom.XMLDesc(0)) == updated
    assert (dom.UUIDString(), updated) in [
        (d.UUIDString(), r) for d, r in domains.list_servers(libvirt_conn)
    ]

    assert guest.lookup(libvirt_conn, dom_uuid).UUIDString() == dom_uuid
    assert guest.lookup(libvirt_conn, tricky.name).UUIDString() == dom_uuid

    clash = xml.replace(dom_uuid, str(uuid.uuid4()))
    with pytest.raises(exception.InstanceExists):
        guest.define(libvirt_conn, clash)

    assert guest.undefine(dom, keep_tpm=False) is True
    assert guest.undefine(dom, keep_tpm=False) is False
    with pytest.raises(exception.InstanceNotFound):
        guest.lookup(libvirt_conn, dom_uuid)


def test_failed_start_leaves_no_secret(
    libvirt_conn: libvirt.virConnect, cleanup: Cleanup, tmp_path: Path
) -> None:
    """E3: the kernel does not exist, the start fails, the secret is gone anyway."""
    dom_uuid = cleanup.domain(str(uuid.uuid4()))
    secret_uuid = cleanup.secret(str(uuid.uuid4()))
    xml, _ = _vtpm_guest_xml(
        dom_uuid, secret_uuid, tmp_path / "console.log",
        kernel=str(tmp_path / "no-such-vmlinuz"), initrd=None,
    )
    dom = guest.define(libvirt_conn, xml)
    passphrase = _passphrase()

    with pytest.raises(exception.VirtError) as info:
        with _for_start(
            libvirt_conn, secret_uuid, dom_uuid, passphrase, persistent=False
        ):
            guest.start(dom)

    text = str(info.value)
    assert f"start domain {dom.name()!r} failed" in text
    assert "VIR_ERR_" in text
    assert passphrase not in text
    assert connection.libvirt_error_code(info.value) is not None
    assert secret.lookup_vtpm_secret(libvirt_conn, secret_uuid) is None
    assert not guest.is_active(dom)
    assert guest.undefine(dom, keep_tpm=False) is True
    assert not state.state_dir(SWTPM_STATE_ROOT, dom_uuid).exists()


def test_start_without_secret_names_the_missing_secret(
    libvirt_conn: libvirt.virConnect, cleanup: Cleanup, tmp_path: Path
) -> None:
    dom_uuid = cleanup.domain(str(uuid.uuid4()))
    secret_uuid = str(uuid.uuid4())
    xml, _ = _vtpm_guest_xml(
        dom_uuid, secret_uuid, tmp_path / "console.log", kernel="/nonexistent/k", initrd=None
    )
    dom = guest.define(libvirt_conn, xml)
    with pytest.raises(exception.VirtError) as info:
        guest.start(dom)
    assert connection.libvirt_error_code(info.value) == libvirt.VIR_ERR_NO_SECRET
    assert "VIR_ERR_NO_SECRET" in str(info.value)


# ------------------------------------------------------------------ real vTPM guests


@pytest.mark.parametrize(
    ("version", "model", "want_version", "want_driver"),
    [
        pytest.param("2.0", "tpm-crb", "2", "tpm_crb", id="2.0-crb"),
        pytest.param("1.2", "tpm-tis", "1.2", "tpm_tis", id="1.2-tis"),
    ],
)
def test_vtpm_guest_boots_with_encrypted_state(
    libvirt_conn: libvirt.virConnect,
    cleanup: Cleanup,
    test_guest: TestGuest,
    tmp_path: Path,
    version: str,
    model: str,
    want_version: str,
    want_driver: str,
) -> None:
    dom_uuid = cleanup.domain(str(uuid.uuid4()))
    secret_uuid = cleanup.secret(str(uuid.uuid4()))
    console_log = tmp_path / "console.log"
    xml, server = _vtpm_guest_xml(
        dom_uuid, secret_uuid, console_log, kernel=str(test_guest.kernel),
        initrd=str(test_guest.initrd), cmdline=test_guest.cmdline, version=version, model=model,
    )
    dom = guest.define(libvirt_conn, xml)
    passphrase = _passphrase()

    with _for_start(
        libvirt_conn, secret_uuid, dom_uuid, passphrase, persistent=False
    ):
        guest.start(dom)
    assert secret.lookup_vtpm_secret(libvirt_conn, secret_uuid) is None  # E3
    guest.wait_for_state(dom, {libvirt.VIR_DOMAIN_SHUTOFF}, BOOT_TIMEOUT)

    result = last_vtpm_result(console_log)
    assert result["version"] == want_version
    assert result["driver"] == want_driver
    assert result["getrandom_rc"] == "0"
    assert passphrase not in read_console(console_log)

    state_file = state.state_file(SWTPM_STATE_ROOT, dom_uuid, version)
    assert state_file.is_file()
    assert state.is_encrypted(state_file)
    header = state.read_blob_header(state_file)
    assert header is not None and header.total_length == state_file.stat().st_size
    assert dom_uuid in state.list_state_dirs(SWTPM_STATE_ROOT)
    assert state.check_permissions(state.state_dir(SWTPM_STATE_ROOT, dom_uuid), "tss", "tss") == []
    assert record.record_from_domain(dom) == server

    # Undefine keeping the TPM (reboot/resize path): the state stays.
    assert guest.undefine(dom, keep_tpm=True) is True
    assert state_file.is_file()
    # Define again with the same UUID, undefine without keeping: the state goes.
    dom = guest.define(libvirt_conn, xml)
    assert guest.undefine(dom, keep_tpm=False) is True
    assert not state.state_dir(SWTPM_STATE_ROOT, dom_uuid).exists()
    assert dom_uuid not in state.list_state_dirs(SWTPM_STATE_ROOT)


def test_graceful_power_off_and_live_record(
    libvirt_conn: libvirt.virConnect, cleanup: Cleanup, test_guest: TestGuest, tmp_path: Path
) -> None:
    dom_uuid = cleanup.domain(str(uuid.uuid4()))
    secret_uuid = cleanup.secret(str(uuid.uuid4()))
    console_log = tmp_path / "console.log"
    xml, server = _vtpm_guest_xml(
        dom_uuid, secret_uuid, console_log, kernel=str(test_guest.kernel),
        initrd=str(test_guest.initrd), cmdline=f"{test_guest.cmdline} vtpm_test=stay",
    )
    dom = guest.define(libvirt_conn, xml)
    with _for_start(
        libvirt_conn, secret_uuid, dom_uuid, _passphrase(), persistent=False
    ):
        guest.start(dom)
    assert guest.wait_for_state(dom, {libvirt.VIR_DOMAIN_RUNNING}, BOOT_TIMEOUT) == (
        libvirt.VIR_DOMAIN_RUNNING
    )

    # A running domain: the record is updated live and in the persistent config.
    updated = _record(server.name, dom_uuid, secret_uuid, user_name="bob")
    record.update_domain_record(dom, updated)
    assert record.record_from_domain(dom) == updated
    inactive_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert record.get_server_record(inactive_xml) == updated

    # Wait until /init listens for the power button, then press it.
    text = _wait_for_console(dom, console_log, "vtpm-guest: staying up")
    assert "no power button" not in text
    assert parse_vtpm_results(text)[-1]["getrandom_rc"] == "0"

    guest.power_off(dom, graceful=True, timeout=60)
    assert not guest.is_active(dom)
    assert dom.state()[1] == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN  # the guest shut down itself
    guest.power_off(dom, graceful=True, timeout=1)  # already off: no-op
    assert guest.undefine(dom, keep_tpm=False) is True
