"""Host-wide domain queries: our servers, every domain, domains with an emulated TPM.

:mod:`~vtpm_driver.virt.guest` acts on one domain; this module answers
questions about all the domains of a connection. Errors are mapped by
:func:`~vtpm_driver.virt.connection.to_vtpm_error`.
"""

from __future__ import annotations

import libvirt
from lxml import etree
from oslo_log import log as logging

from vtpm_driver import exception
from vtpm_driver.model.request import show
from vtpm_driver.model.server import Instance
from vtpm_driver.virt import connection, guest, record

LOG = logging.getLogger(__name__)

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def _all(conn: libvirt.virConnect) -> list[libvirt.virDomain]:
    try:
        return list(conn.listAllDomains(0))
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, "list domains") from exc


def _label(dom: libvirt.virDomain) -> str:
    try:
        return f"domain {dom.name()!r}"
    except libvirt.libvirtError:
        return "domain"


def domain_uuids(conn: libvirt.virConnect) -> list[str]:
    """UUIDs of every domain, ours or not (the audit: a foreign domain's state is no orphan)."""
    found = []
    for dom in _all(conn):
        try:
            found.append(dom.UUIDString())
        except libvirt.libvirtError as exc:
            raise connection.to_vtpm_error(exc, "list domains") from exc
    return sorted(found)


def list_servers(conn: libvirt.virConnect) -> list[tuple[libvirt.virDomain, Instance]]:
    """Every domain carrying our server record, with its server, sorted by name.

    Domains without a record (not ours) are left out; one that disappears
    while listing is skipped, and one whose record is unreadable is skipped
    with a warning (one broken domain must not hide the others).
    """
    found = []
    for dom in _all(conn):
        try:
            server = record.record_from_domain(dom)
        except exception.InstanceNotFound:
            continue
        except exception.VirtError as exc:
            LOG.warning("Skipping %s: %s", _label(dom), exc)
            continue
        if server is not None:
            found.append((dom, server))
    return sorted(found, key=lambda pair: (pair[1].name, pair[1].uuid))


def find_server(conn: libvirt.virConnect, name_or_uuid: str) -> Instance:
    """The server whose domain has this UUID or name.

    :raises InstanceNotFound: no such domain (also one undefined between the lookup
        and the read of its record: a delete that ran meanwhile, said in the lookup's
        words), or the domain is not one of ours (it carries no server record).
    """
    dom = guest.lookup(conn, name_or_uuid)
    try:
        server = record.record_from_domain(dom)
    except exception.InstanceNotFound:
        guest.lookup(conn, name_or_uuid)  # raises the lookup's "no server with name or UUID"
        raise
    if server is None:
        raise exception.InstanceNotFound(
            f"domain {show(name_or_uuid)} exists but is not a vtpm-driver server "
            "(it has no server record in its <metadata>)"
        )
    return server


def tpm_emulator_domains(conn: libvirt.virConnect) -> list[str]:
    """UUIDs of every domain (ours or not) with an emulator ``<tpm>`` (SPEC C4)."""
    found = []
    for dom in _all(conn):
        try:
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            uuid = dom.UUIDString()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # undefined while we listed
            raise connection.to_vtpm_error(exc, "read domain XML") from exc
        try:
            root = etree.fromstring(xml.encode(), _PARSER)
        except etree.XMLSyntaxError:
            continue
        if root.find("devices/tpm/backend[@type='emulator']") is not None:
            found.append(uuid)
    return sorted(found)


def managed_tpm_emulator_domains(conn: libvirt.virConnect) -> list[str]:
    """UUIDs of this driver's servers (domains with our record) that have an emulator
    ``<tpm>`` (SPEC C4: the servers the driver manages; another tool's domains are
    not its to protect or to block start-up for)."""
    ours = {server.uuid for _dom, server in list_servers(conn)}
    return [uuid for uuid in tpm_emulator_domains(conn) if uuid in ours]
