"""libvirt's side of moving a domain to another host (the only libvirt user for it).

Both cold and live migration go through libvirt's own migration stream
(``virDomainMigrateToURI3``, peer to peer: the source libvirtd talks to the
destination's). QEMU carries the swtpm state in that stream, so no file of
the TPM is copied by us and no shared storage is needed; the destination's
swtpm writes the state with its own owner and modes (``tss``, 0700/0600).

* live: ``LIVE | PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE``; libvirt
  removes the source's definition and swtpm state once the guest runs on the
  destination, and resumes the source guest if anything fails.
* cold (the guest is off): the caller starts it PAUSED on the source (no
  guest code runs), and :func:`migrate` moves the paused guest without
  ``UNDEFINE_SOURCE``: the source keeps its definition and TPM state for a
  revert; resuming the paused guest on the destination is a cold boot there.

QEMU on the destination listens on the address of the destination's URI
(``VIR_MIGRATE_PARAM_LISTEN_ADDRESS``) and the source connects to that address
(``VIR_MIGRATE_PARAM_URI tcp://ADDR``): set on every migration, so traffic
never leaves the addresses the operator named (``migration_host`` in
qemu.conf cannot be a loopback address).
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import libvirt
from oslo_log import log as logging

from vtpm_driver.virt import connection, guest, secret

LOG = logging.getLogger(__name__)

LIVE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
              | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
#: A paused guest (cold migration): the source keeps its definition and state.
PAUSED_FLAGS = libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST


def _label(dom: libvirt.virDomain) -> str:
    try:
        return f"domain {dom.name()!r}"
    except libvirt.libvirtError:
        return "domain"


def migration_address(uri: str) -> str | None:
    """The host part of a libvirt URI (``qemu+tcp://10.0.0.2/system`` -> ``10.0.0.2``).

    None for a local URI (``qemu:///system``): libvirt's defaults apply.
    """
    host = urllib.parse.urlsplit(uri).hostname
    return host or None


def migration_params(address: str | None, bandwidth_mib: int | None = None) -> dict[str, Any]:
    """``virDomainMigrateToURI3`` parameters: loopback/explicit address, optional bandwidth."""
    params: dict[str, Any] = {}
    if address:
        shown = f"[{address}]" if ":" in address else address
        params[libvirt.VIR_MIGRATE_PARAM_URI] = f"tcp://{shown}"
        params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = address
    if bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib)
    return params


def migrate(dom: libvirt.virDomain, dest_uri: str, *, live: bool,
            bandwidth_mib: int | None = None) -> None:
    """Move ``dom`` to the libvirtd at ``dest_uri`` (see the module docstring).

    Returns when the guest runs (live) or sits paused (cold) on the destination.

    :raises HypervisorUnavailable: the destination cannot be reached.
    :raises VirtError: libvirt or QEMU failed (e.g. the destination could not
        unlock the TPM state); the source guest is as it was.
    """
    label = _label(dom)
    params = migration_params(migration_address(dest_uri), bandwidth_mib)
    try:
        dom.migrateToURI3(dest_uri, params, LIVE_FLAGS if live else PAUSED_FLAGS)
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(
            exc, f"{'live-migrate' if live else 'migrate'} {label} to {dest_uri}") from exc
    LOG.debug("Migrated %s to %s (live=%s)", label, dest_uri, live)


def abort(dom: libvirt.virDomain) -> bool:
    """Cancel the domain's running migration job; False when none was running."""
    try:
        dom.abortJob()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
            return False
        raise connection.to_vtpm_error(exc, f"abort the job of {_label(dom)}") from exc
    return True


def job_active(dom: libvirt.virDomain) -> bool:
    """Whether a job (e.g. a migration) runs on the domain."""
    try:
        return int(dom.jobInfo()[0]) not in (libvirt.VIR_DOMAIN_JOB_NONE,)
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, f"get the job of {_label(dom)}") from exc


def start_paused(dom: libvirt.virDomain) -> None:
    """Start the domain with its vCPUs stopped (swtpm runs, no guest code does)."""
    guest.start(dom, libvirt.VIR_DOMAIN_START_PAUSED)


def is_paused(dom: libvirt.virDomain) -> bool:
    return guest.get_state(dom) == libvirt.VIR_DOMAIN_PAUSED


def resume(dom: libvirt.virDomain) -> None:
    """Let a paused guest run (idempotent for a running one)."""
    if not is_paused(dom):
        return
    try:
        dom.resume()
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, f"resume {_label(dom)}") from exc


def domain_xml(dom: libvirt.virDomain) -> str:
    """The persistent definition (to re-create the domain elsewhere)."""
    try:
        return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, f"read {_label(dom)}") from exc


def remove_tpm_state(conn: libvirt.virConnect, xml: str) -> None:
    """Remove a domain's swtpm state on a host we reach only through libvirt.

    A failed incoming migration may leave the state directory behind with no
    domain. Defining the domain there and undefining it with
    ``VIR_DOMAIN_UNDEFINE_TPM`` makes libvirt delete it; a no-op when there is
    none. The domain must not exist there already (the caller checked).
    """
    dom = guest.define(conn, xml)
    guest.undefine(dom, keep_tpm=False)


class HostSecretReader:
    """The value of a ``host`` mode (persistent, non-private) libvirt vTPM secret.

    Used to hand a host-mode passphrase to a destination host without the
    owner, as Nova does; ``user``/``deployment`` secrets are private and
    ephemeral and can never be read back.
    """

    def __init__(self, conn_factory: Any) -> None:
        self._conn = conn_factory

    def __repr__(self) -> str:
        return "HostSecretReader()"

    def __call__(self, secret_uuid: str) -> str | None:
        """The passphrase, or None when this host has no readable secret of that UUID."""
        conn = self._conn() if callable(self._conn) else self._conn
        found = secret.lookup_vtpm_secret(conn, secret_uuid)
        if found is None:
            return None
        try:
            value = found.value(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_NO_SECRET,
                                        libvirt.VIR_ERR_INVALID_SECRET,
                                        libvirt.VIR_ERR_OPERATION_DENIED):
                return None
            raise connection.to_vtpm_error(exc, f"read libvirt secret {secret_uuid}") from exc
        return value.decode() if isinstance(value, bytes) else str(value)
