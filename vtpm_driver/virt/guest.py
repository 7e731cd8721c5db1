"""Thin operations on a libvirt domain, with errors in our hierarchy.

Each function does one libvirt thing and maps failures through
:func:`~vtpm_driver.virt.connection.to_vtpm_error`: ``InstanceNotFound`` when
the domain is gone, ``HypervisorUnavailable`` when libvirtd is, ``VirtError``
(with libvirt's message and ``VIR_ERR_*`` code) otherwise. The driver composes
them; none of them touches secrets or Barbican.
"""

from __future__ import annotations

import time
import uuid as uuid_mod
from collections.abc import Collection

import libvirt
from oslo_log import log as logging

from vtpm_driver import exception
from vtpm_driver.virt import connection, domain
from vtpm_driver.virt._validate import show

LOG = logging.getLogger(__name__)

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended by guest power management",
}

_POLL_INTERVAL = 0.1


def state_name(state: int) -> str:
    """Human name of a ``VIR_DOMAIN_*`` state."""
    return STATE_NAMES.get(state, f"state {state}")


def _label(dom: libvirt.virDomain) -> str:
    try:
        return f"domain {dom.name()!r}"
    except libvirt.libvirtError:
        return "domain"


def _exists_error(exc: libvirt.libvirtError) -> bool:
    # libvirt reports a name/UUID clash as VIR_ERR_OPERATION_FAILED "... already
    # exists with uuid ..." (VIR_ERR_DOM_EXIST in some drivers).
    code = exc.get_error_code()
    if code == libvirt.VIR_ERR_DOM_EXIST:
        return True
    return code == libvirt.VIR_ERR_OPERATION_FAILED and "already exists" in str(exc)


def define(conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
    """Define (or redefine, same name and UUID) a persistent domain.

    :raises InstanceExists: another domain has this name or UUID.
    :raises VirtError: libvirt refused the XML.
    """
    try:
        return conn.defineXML(xml)
    except libvirt.libvirtError as exc:
        if _exists_error(exc):
            raise exception.InstanceExists(
                f"define domain failed: {connection.describe(exc)}"
            ) from exc
        raise connection.to_vtpm_error(exc, "define domain") from exc


def start(dom: libvirt.virDomain, flags: int = 0) -> None:
    """Start a defined domain (``virDomainCreateWithFlags``)."""
    label = _label(dom)
    try:
        dom.createWithFlags(flags)
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, f"start {label}") from exc
    LOG.debug("Started %s", label)


def get_state(dom: libvirt.virDomain) -> int:
    """The domain's ``VIR_DOMAIN_*`` state."""
    try:
        return int(dom.state()[0])
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, f"get state of {_label(dom)}") from exc


def wait_for_state(dom: libvirt.virDomain, states: Collection[int], timeout: float) -> int:
    """Poll until the domain is in one of ``states``; return the state reached.

    :raises VirtError: not reached within ``timeout`` seconds (names the
        current state).
    """
    if not states:
        raise exception.VirtError("wait_for_state needs at least one state to wait for")
    deadline = time.monotonic() + timeout
    while True:
        current = get_state(dom)
        if current in states:
            return current
        if time.monotonic() >= deadline:
            wanted = " or ".join(state_name(s) for s in sorted(states))
            raise exception.VirtError(
                f"{_label(dom)} did not become {wanted} within {timeout:g} s "
                f"(it is {state_name(current)})"
            )
        time.sleep(_POLL_INTERVAL)


def is_active(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, f"check {_label(dom)}") from exc


def destroy(dom: libvirt.virDomain) -> bool:
    """Hard power-off; True if it was running, False if it already was off."""
    label = _label(dom)
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and not is_active(dom):
            return False
        raise connection.to_vtpm_error(exc, f"power off {label}") from exc
    return True


def _request_shutdown(dom: libvirt.virDomain, label: str) -> None:
    try:
        dom.shutdown()
    except libvirt.libvirtError as exc:
        # "domain is not running": it stopped in between, the wait sees it.
        if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
            raise connection.to_vtpm_error(exc, f"shut down {label}") from exc


def power_off(
    dom: libvirt.virDomain, graceful: bool, timeout: float, retry_interval: float = 10.0
) -> None:
    """Stop the domain; no-op when it is already off.

    ``graceful``: press the ACPI power button, again every ``retry_interval``
    seconds (as Nova does: a guest still booting misses the first press),
    for up to ``timeout`` seconds; then pull the plug. Otherwise pull the plug
    at once.
    """
    if not is_active(dom):
        return
    label = _label(dom)
    if graceful:
        deadline = time.monotonic() + timeout
        try:
            while True:
                _request_shutdown(dom, label)
                remaining = deadline - time.monotonic()
                try:
                    wait_for_state(
                        dom, {libvirt.VIR_DOMAIN_SHUTOFF}, max(0.0, min(retry_interval, remaining))
                    )
                    return
                except exception.VirtError:
                    if remaining <= retry_interval:
                        break
                    LOG.debug("%s still running; pressing the power button again", label)
        except exception.InstanceNotFound:
            return  # a transient domain is gone once it shuts down
        LOG.info("%s did not shut down within %s s; destroying it", label, timeout)
    try:
        destroy(dom)
    except exception.InstanceNotFound:
        return


def undefine_flags(keep_tpm: bool) -> int:
    """``virDomainUndefineFlags`` flags: drop managed save and NVRAM; keep or drop TPM."""
    flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    if keep_tpm:
        flags |= libvirt.VIR_DOMAIN_UNDEFINE_KEEP_TPM
    else:
        flags |= libvirt.VIR_DOMAIN_UNDEFINE_TPM
    return flags


def undefine(dom: libvirt.virDomain, keep_tpm: bool) -> bool:
    """Undefine the domain; True if it was defined, False if already gone.

    ``keep_tpm=True`` keeps the swtpm state directory (reboot, resize: the
    domain is defined again with the same UUID); ``False`` deletes it (delete).
    Power the domain off first: a running domain only becomes transient.
    """
    label = _label(dom)
    try:
        dom.undefineFlags(undefine_flags(keep_tpm))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise connection.to_vtpm_error(exc, f"undefine {label}") from exc
    LOG.debug("Undefined %s (keep_tpm=%s)", label, keep_tpm)
    return True


def lookup(conn: libvirt.virConnect, name_or_uuid: str) -> libvirt.virDomain:
    """The domain with this UUID or name (UUID first, as ``virsh`` does).

    :raises InstanceNotFound: none has it.
    """
    if not isinstance(name_or_uuid, str) or not name_or_uuid:
        raise exception.InstanceNotFound(f"no server named {show(name_or_uuid)}")
    try:
        canonical = str(uuid_mod.UUID(name_or_uuid))
    except ValueError:
        canonical = None
    try:
        if canonical is not None:
            try:
                return conn.lookupByUUIDString(canonical)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return conn.lookupByName(name_or_uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise exception.InstanceNotFound(
                f"no server with name or UUID {show(name_or_uuid)} on this host"
            ) from exc
        raise connection.to_vtpm_error(exc, f"look up domain {show(name_or_uuid)}") from exc


def list_domains_with_record(
    conn: libvirt.virConnect,
) -> list[tuple[libvirt.virDomain, domain.ServerRecord]]:
    """Every domain carrying our server record, sorted by name.

    Domains without a record (not ours) are left out; one that disappears
    while listing is skipped, and one whose record is unreadable is skipped
    with a warning (one broken domain must not hide the others).
    """
    try:
        domains = conn.listAllDomains(0)
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, "list domains") from exc
    found = []
    for dom in domains:
        try:
            record = domain.record_from_domain(dom)
        except exception.InstanceNotFound:
            continue
        except exception.VirtError as exc:
            LOG.warning("Skipping %s: %s", _label(dom), exc)
            continue
        if record is not None:
            found.append((dom, record))
    return sorted(found, key=lambda pair: (pair[1].name, pair[1].uuid))
