"""A real guest sees an encrypted emulated TPM (libvirt + QEMU + swtpm, no vtpm_driver code).

The domain XML is written by hand here on purpose: these tests pin down what libvirt on
this host does with a vTPM, independently of the XML our driver will generate.
"""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt
import pytest

from tests.functional.fixtures_libvirt import (
    SWTPM_BLOB_FLAG_ENCRYPTED,
    Cleanup,
    TestGuest,
    define_vtpm_secret,
    parse_vtpm_results,
    read_console,
    swtpm_blob_flags,
    swtpm_state_dir,
    swtpm_state_file,
    wait_for_shutoff,
)
from vtpm_driver.guestreport import tpm_of

pytestmark = pytest.mark.functional

# (libvirt backend version, libvirt model, what the guest reports as version and driver)
CASES = [
    pytest.param("1.2", "tpm-tis", "1.2", "tpm_tis", id="1.2-tis"),
    pytest.param("2.0", "tpm-tis", "2", "tpm_tis", id="2.0-tis"),
    pytest.param("2.0", "tpm-crb", "2", "tpm_crb", id="2.0-crb"),
]


def domain_xml(dom_uuid: str, guest: TestGuest, console_log: Path, version: str,
               model: str, secret_uuid: str) -> str:
    """TCG q35 guest, direct kernel boot, file console, encrypted emulator vTPM."""
    return f"""\
<domain type='qemu'>
  <name>vtpm-test-{dom_uuid[:8]}</name>
  <uuid>{dom_uuid}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(guest.kernel))}</kernel>
    <initrd>{escape(str(guest.initrd))}</initrd>
    <cmdline>{escape(guest.cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'>
      <source path={quoteattr(str(console_log))}/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path={quoteattr(str(console_log))}/>
      <target type='serial' port='0'/>
    </console>
    <tpm model={quoteattr(model)}>
      <backend type='emulator' version={quoteattr(version)}>
        <encryption secret={quoteattr(secret_uuid)}/>
      </backend>
    </tpm>
  </devices>
</domain>
"""


def new_passphrase() -> bytes:
    return secrets.token_urlsafe(32).encode()


def boot(conn: libvirt.virConnect, cleanup: Cleanup, dom: libvirt.virDomain,
         console_log: Path, secret_uuid: str, passphrase: bytes) -> dict[str, str]:
    """Define the secret, start the guest, drop the secret, wait for power-off.

    Returns the guest's VTPM_RESULT of this boot.
    """
    cleanup.secret(secret_uuid)
    define_vtpm_secret(conn, secret_uuid, dom.UUIDString(), passphrase)
    # libvirt (virtlogd) appends to the console log: this boot's lines are those after
    # its current end. (Unlinking it instead raced virtlogd under load: a boot after a
    # failed start wrote to the old, unlinked file.)
    seen = len(read_console(console_log))
    try:
        dom.create()
    finally:
        # As the driver will do: the passphrase is needed at start only.
        conn.secretLookupByUUIDString(secret_uuid).undefine()
    with pytest.raises(libvirt.libvirtError) as err:
        conn.secretLookupByUUIDString(secret_uuid)
    assert err.value.get_error_code() == libvirt.VIR_ERR_NO_SECRET
    wait_for_shutoff(dom)
    text = read_console(console_log)
    results = parse_vtpm_results(text[seen:])
    assert results, (f"no VTPM_RESULT from this boot in {console_log}; "
                     f"it ends with:\n{text[-3000:]}")
    return results[-1]


def define_domain(conn: libvirt.virConnect, cleanup: Cleanup, guest: TestGuest,
                  tmp_path: Path, version: str, model: str
                  ) -> tuple[libvirt.virDomain, Path, str]:
    dom_uuid = cleanup.domain(str(uuid.uuid4()))
    secret_uuid = str(uuid.uuid4())
    console_log = tmp_path / f"console-{dom_uuid}.log"
    dom = conn.defineXML(domain_xml(dom_uuid, guest, console_log, version, model,
                                    secret_uuid))
    return dom, console_log, secret_uuid


@pytest.mark.parametrize(("version", "model", "want_version", "want_driver"), CASES)
def test_guest_sees_encrypted_vtpm(libvirt_conn, test_guest, cleanup, tmp_path,
                                   version, model, want_version, want_driver):
    dom, console_log, secret_uuid = define_domain(libvirt_conn, cleanup, test_guest,
                                                  tmp_path, version, model)

    result = boot(libvirt_conn, cleanup, dom, console_log, secret_uuid, new_passphrase())

    assert result["version"] == want_version
    assert result["driver"] == want_driver
    assert result["getrandom_rc"] == "0"
    assert result["ek"] != "none"
    assert len(result["ek"]) == 64
    int(result["ek"], 16)
    if want_version == "2":  # its first boot sealed a value to PCR 7 (tpm2-tools)
        assert result["sealed_at"] == "new" and len(result["sealed"]) == 64, result
        assert len(result["pcr7"]) == 64, result
    else:
        assert (result["sealed"], result["pcr7"]) == ("none", "none")

    state_file = swtpm_state_file(dom.UUIDString(), version)
    assert state_file.is_file(), sorted(swtpm_state_dir(dom.UUIDString()).rglob("*"))
    assert swtpm_blob_flags(state_file) & SWTPM_BLOB_FLAG_ENCRYPTED


@pytest.mark.parametrize(("version", "model"), [
    pytest.param("1.2", "tpm-tis", id="1.2-tis"),
    pytest.param("2.0", "tpm-crb", id="2.0-crb"),
])
def test_tpm_identity_follows_state(libvirt_conn, test_guest, cleanup, tmp_path,
                                    version, model):
    dom, console_log, secret_uuid = define_domain(libvirt_conn, cleanup, test_guest,
                                                  tmp_path, version, model)
    passphrase = new_passphrase()
    first = boot(libvirt_conn, cleanup, dom, console_log, secret_uuid, passphrase)
    assert first["ek"] != "none"

    # The state is really encrypted with the passphrase: another one cannot open it.
    with pytest.raises(libvirt.libvirtError):
        boot(libvirt_conn, cleanup, dom, console_log, secret_uuid, new_passphrase())
    assert not dom.isActive()

    # Same domain, secret redefined with the same value: the same TPM comes back.
    second = boot(libvirt_conn, cleanup, dom, console_log, secret_uuid, passphrase)
    assert second["getrandom_rc"] == "0"
    assert tpm_of(second) == tpm_of(first)
    if version == "2.0":  # read back, not sealed again
        assert (first["sealed_at"], second["sealed_at"]) == ("new", "kept")

    # A new domain gets a freshly manufactured TPM.
    other, other_log, other_secret = define_domain(libvirt_conn, cleanup, test_guest,
                                                   tmp_path, version, model)
    fresh = boot(libvirt_conn, cleanup, other, other_log, other_secret, passphrase)
    assert fresh["ek"] not in ("none", first["ek"])
    if version == "2.0":  # what the guest sealed in the other TPM is not in this one
        assert fresh["sealed_at"] == "new" and fresh["sealed"] != first["sealed"]
