"""Host-wide domain queries (vtpm_driver.virt.domains) over fake libvirt objects."""

from __future__ import annotations

import libvirt
import pytest

from tests.fakes.libvirt import FakeLibvirt, ScriptedConn, ScriptedDomain, libvirt_error
from vtpm_driver import exception
from vtpm_driver.model.server import Instance, canonical_uuid
from vtpm_driver.virt import domains, record

UUID = "0b7e6f0e-3a8a-4f51-8c1f-1d2a3b4c5d6e"


def test_list_servers_skips_foreign_and_broken() -> None:
    server = Instance(name="b-server", uuid=UUID, user_id="u", project_id="p")
    ours = ScriptedDomain("ours")
    ours.metadata_xml = record.record_xml(server, qualified=False)
    foreign = ScriptedDomain("foreign")
    broken = ScriptedDomain("broken")
    broken.metadata_xml = "<server><name>x</name></server>"
    gone = ScriptedDomain("gone")
    gone.metadata_xml = "<server/>"
    gone.metadata = lambda *a: (_ for _ in ()).throw(  # type: ignore[method-assign]
        libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU)
    )
    listed = domains.list_servers(ScriptedConn([foreign, broken, gone, ours]))
    assert listed == [(ours, server)]




def _xml(uuid: str, devices: str = "") -> str:
    return (f"<domain><name>d-{uuid[:8]}</name><uuid>{uuid}</uuid>"
            f"<devices>{devices}</devices></domain>")


def test_tpm_emulator_domains_counts_every_domain_with_an_emulated_tpm() -> None:
    conn = FakeLibvirt()
    with_tpm, passthrough, plain = (str(canonical_uuid(f"{n}" * 32)) for n in "123")
    conn.defineXML(_xml(with_tpm, "<tpm model='tpm-crb'><backend type='emulator'/></tpm>"))
    conn.defineXML(_xml(passthrough, "<tpm model='tpm-tis'><backend type='passthrough'/></tpm>"))
    conn.defineXML(_xml(plain))
    assert domains.tpm_emulator_domains(conn) == [with_tpm]
    assert domains.domain_uuids(conn) == sorted([with_tpm, passthrough, plain])


def test_find_server_refuses_a_domain_that_is_not_ours() -> None:
    conn = FakeLibvirt()
    conn.defineXML(_xml(UUID))
    with pytest.raises(exception.InstanceNotFound, match="not a vtpm-driver server"):
        domains.find_server(conn, UUID)
    conn.domains[UUID].xml = record.set_server_record(
        conn.domains[UUID].xml,
        Instance(name="n", uuid=UUID, user_id="u", project_id="p"))
    assert domains.find_server(conn, UUID).name == "n"


def test_find_server_of_a_domain_deleted_after_its_lookup_says_no_server() -> None:
    """A delete between the lookup and the record's read (the soak's race, outside the
    server's lock) is the lookup's own answer, not a failed read."""
    conn = FakeLibvirt()
    conn.defineXML(_xml(UUID))
    dom = conn.lookupByUUIDString(UUID)

    def undefined_meanwhile(*_args: object) -> str:
        conn.domains.pop(UUID)
        raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU)

    dom.metadata = undefined_meanwhile  # type: ignore[method-assign]
    lookups = iter([lambda _uuid: dom, conn.lookupByUUIDString])
    conn.lookupByUUIDString = lambda uuid: next(lookups)(uuid)  # type: ignore[method-assign]
    with pytest.raises(exception.InstanceNotFound,
                       match=f"no server with name or UUID '{UUID}' on this host"):
        domains.find_server(conn, UUID)


def test_managed_tpm_emulator_domains_are_only_ours() -> None:
    conn = FakeLibvirt()
    ours, foreign = (str(canonical_uuid(f"{n}" * 32)) for n in "45")
    tpm = "<tpm model='tpm-tis'><backend type='emulator'/></tpm>"
    conn.defineXML(record.set_server_record(
        _xml(ours, tpm), Instance(name="n", uuid=ours, user_id="u", project_id="p")))
    conn.defineXML(_xml(foreign, tpm))
    assert domains.tpm_emulator_domains(conn) == sorted([ours, foreign])
    assert domains.managed_tpm_emulator_domains(conn) == [ours]
