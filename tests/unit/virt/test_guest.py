"""Domain operations against fake libvirt objects: flags and error mapping."""

from __future__ import annotations

import libvirt
import pytest

from tests.fakes.libvirt import ScriptedConn, ScriptedDomain, libvirt_error
from vtpm_driver import exception
from vtpm_driver.virt import connection, guest

UUID = "0b7e6f0e-3a8a-4f51-8c1f-1d2a3b4c5d6e"


def test_start_maps_failure_with_message_and_code() -> None:
    dom = ScriptedDomain()
    dom.fail["create"] = libvirt_error(
        libvirt.VIR_ERR_NO_SECRET, libvirt.VIR_FROM_SECRET, "no secret with matching uuid"
    )
    with pytest.raises(exception.VirtError) as info:
        guest.start(dom)
    text = str(info.value)
    assert "start domain 'vm1' failed" in text
    assert "no secret with matching uuid" in text
    assert "VIR_ERR_NO_SECRET" in text
    assert connection.libvirt_error_code(info.value) == libvirt.VIR_ERR_NO_SECRET


def test_start_when_libvirtd_is_gone() -> None:
    dom = ScriptedDomain()
    dom.fail["create"] = libvirt_error(
        libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, "Cannot write data: Broken pipe"
    )
    with pytest.raises(exception.HypervisorUnavailable, match="Broken pipe"):
        guest.start(dom)


def test_undefine_flags() -> None:
    keep = guest.undefine_flags(keep_tpm=True)
    drop = guest.undefine_flags(keep_tpm=False)
    assert keep & libvirt.VIR_DOMAIN_UNDEFINE_KEEP_TPM
    assert not keep & libvirt.VIR_DOMAIN_UNDEFINE_TPM
    assert drop & libvirt.VIR_DOMAIN_UNDEFINE_TPM
    assert not drop & libvirt.VIR_DOMAIN_UNDEFINE_KEEP_TPM
    for flags in (keep, drop):
        assert flags & libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        assert flags & libvirt.VIR_DOMAIN_UNDEFINE_NVRAM


def test_undefine_passes_flags_and_is_idempotent() -> None:
    dom = ScriptedDomain()
    assert guest.undefine(dom, keep_tpm=True) is True
    assert dom.calls == [("undefine", guest.undefine_flags(True))]
    dom.fail["undefine"] = libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU)
    assert guest.undefine(dom, keep_tpm=False) is False
    dom.fail["undefine"] = libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU)
    with pytest.raises(exception.VirtError, match="undefine domain 'vm1'"):
        guest.undefine(dom, keep_tpm=False)


def test_remove_pulls_the_plug_then_undefines() -> None:
    dom = ScriptedDomain(state=libvirt.VIR_DOMAIN_RUNNING)
    assert guest.remove(dom) is True
    assert dom.calls == [("destroy", None), ("undefine", guest.undefine_flags(False))]
    assert not dom.isActive()


def test_remove_keeps_the_tpm_when_asked() -> None:
    dom = ScriptedDomain(state=libvirt.VIR_DOMAIN_RUNNING)
    assert guest.remove(dom, keep_tpm=True) is True
    assert dom.calls[-1] == ("undefine", guest.undefine_flags(True))


def test_remove_a_stopped_domain_undefines_it() -> None:
    dom = ScriptedDomain()  # shut off: libvirt refuses the destroy as "not running"
    dom.fail["destroy"] = libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU)
    assert guest.remove(dom) is True
    assert dom.calls == [("destroy", None), ("undefine", guest.undefine_flags(False))]


def test_remove_a_running_transient_domain() -> None:
    dom = ScriptedDomain(state=libvirt.VIR_DOMAIN_RUNNING)
    dom.fail["undefine"] = libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU)
    assert guest.remove(dom) is True  # gone once stopped: nothing left to undefine


def test_remove_is_a_no_op_once_gone() -> None:
    dom = ScriptedDomain()
    dom.fail["destroy"] = libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU)
    assert guest.remove(dom) is False
    assert dom.calls == [("destroy", None)]


def test_remove_reports_a_failed_undefine() -> None:
    dom = ScriptedDomain(state=libvirt.VIR_DOMAIN_RUNNING)
    dom.fail["undefine"] = libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU)
    with pytest.raises(exception.VirtError, match="undefine domain 'vm1'"):
        guest.remove(dom)


def test_lookup_by_uuid_then_name() -> None:
    named = ScriptedDomain("vm1")
    by_uuid = ScriptedDomain("other")
    conn = ScriptedConn([named, by_uuid])
    conn.by_uuid[UUID] = by_uuid
    assert guest.lookup(conn, "vm1") is named
    assert guest.lookup(conn, UUID.upper()) is by_uuid
    # A UUID-shaped *name* still resolves when no domain has that UUID.
    uuid_named = ScriptedDomain("11111111-2222-4333-8444-555555555555")
    conn.domains.append(uuid_named)
    assert guest.lookup(conn, "11111111-2222-4333-8444-555555555555") is uuid_named


@pytest.mark.parametrize("missing", ["nope", UUID, "", None])
def test_lookup_missing_is_instance_not_found(missing: object) -> None:
    with pytest.raises(exception.InstanceNotFound):
        guest.lookup(ScriptedConn([]), missing)  # type: ignore[arg-type]


def test_define_maps_name_clash_to_instance_exists() -> None:
    conn = ScriptedConn([])
    conn.define_error = libvirt_error(
        libvirt.VIR_ERR_OPERATION_FAILED,
        libvirt.VIR_FROM_DOMAIN,
        "operation failed: domain 'vm1' already exists with uuid x",
    )
    with pytest.raises(exception.InstanceExists, match="already exists"):
        guest.define(conn, "<domain/>")
    conn.define_error = libvirt_error(libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_FROM_DOMAIN, "bad")
    with pytest.raises(exception.VirtError, match="VIR_ERR_XML_ERROR"):
        guest.define(conn, "<domain/>")


def test_wait_for_state_returns_or_names_current_state() -> None:
    dom = ScriptedDomain(state=libvirt.VIR_DOMAIN_RUNNING)
    assert guest.wait_for_state(dom, {libvirt.VIR_DOMAIN_RUNNING}, 0) == libvirt.VIR_DOMAIN_RUNNING
    with pytest.raises(exception.VirtError, match=r"did not become shut off .*it is running"):
        guest.wait_for_state(dom, {libvirt.VIR_DOMAIN_SHUTOFF}, 0)
    with pytest.raises(exception.VirtError):
        guest.wait_for_state(dom, set(), 1)
    dom.fail["state"] = libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU)
    with pytest.raises(exception.InstanceNotFound):
        guest.wait_for_state(dom, {libvirt.VIR_DOMAIN_SHUTOFF}, 0)


def test_power_off_paths() -> None:
    off = ScriptedDomain()
    guest.power_off(off, graceful=True, timeout=0)
    assert off.calls == []

    hard = ScriptedDomain(state=libvirt.VIR_DOMAIN_RUNNING)
    guest.power_off(hard, graceful=False, timeout=0)
    assert hard.calls == [("destroy", None)]

    polite = ScriptedDomain(state=libvirt.VIR_DOMAIN_RUNNING)
    guest.power_off(polite, graceful=True, timeout=5)
    assert polite.calls == [("shutdown", None)]

    stubborn = ScriptedDomain(state=libvirt.VIR_DOMAIN_RUNNING)
    stubborn.shutdown_works = False
    guest.power_off(stubborn, graceful=True, timeout=0)
    assert stubborn.calls == [("shutdown", None), ("destroy", None)]
    assert not stubborn.isActive()


def test_power_off_presses_the_button_again() -> None:
    # A guest still booting misses the first ACPI press (Nova resends too).
    late = ScriptedDomain(state=libvirt.VIR_DOMAIN_RUNNING)
    late.presses_needed = 3
    guest.power_off(late, graceful=True, timeout=60, retry_interval=0)
    assert late.calls == [("shutdown", None)] * 3
    assert not late.isActive()


def test_power_off_shutdown_error_is_mapped() -> None:
    dom = ScriptedDomain(state=libvirt.VIR_DOMAIN_RUNNING)
    dom.fail["shutdown"] = libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU)
    with pytest.raises(exception.VirtError, match="shut down domain 'vm1'"):
        guest.power_off(dom, graceful=True, timeout=1)
    dom.fail["shutdown"] = libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU)
    guest.power_off(dom, graceful=True, timeout=0)
    assert dom.calls[-1] == ("destroy", None)


def test_destroy_of_a_stopped_domain_is_a_no_op() -> None:
    dom = ScriptedDomain(state=libvirt.VIR_DOMAIN_SHUTOFF)
    dom.fail["destroy"] = libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU)
    assert guest.destroy(dom) is False


def test_state_name() -> None:
    assert guest.state_name(libvirt.VIR_DOMAIN_RUNNING) == "running"
    assert guest.state_name(99) == "state 99"


def test_power_state_names_follow_nova() -> None:
    assert guest.power_state(ScriptedDomain(state=libvirt.VIR_DOMAIN_RUNNING)) == "running"
    assert guest.power_state(ScriptedDomain(state=libvirt.VIR_DOMAIN_SHUTDOWN)) == "running"
    assert guest.power_state(ScriptedDomain(state=libvirt.VIR_DOMAIN_PAUSED)) == "paused"
    assert guest.power_state(ScriptedDomain(state=libvirt.VIR_DOMAIN_SHUTOFF)) == "shutdown"
    assert guest.power_state(ScriptedDomain(state=99)) == "pending"
    saved = ScriptedDomain(state=libvirt.VIR_DOMAIN_SHUTOFF)
    saved.managed_save = True
    assert guest.power_state(saved) == "suspended"


def test_reboot_failure_is_a_virt_error_naming_the_domain() -> None:
    dom = ScriptedDomain(state=libvirt.VIR_DOMAIN_RUNNING)
    dom.fail["reboot"] = libvirt_error(libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_FROM_QEMU,
                                       "no ACPI")
    with pytest.raises(exception.VirtError, match="reboot domain 'vm1' failed: no ACPI"):
        guest.reboot(dom)
