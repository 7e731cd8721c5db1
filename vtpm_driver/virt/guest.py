"""Thin operations on a libvirt domain, with errors in our hierarchy.

Each function does one libvirt thing and maps failures through
:func:`~vtpm_driver.virt.connection.to_vtpm_error`: ``InstanceNotFound`` when
the domain is gone, ``HypervisorUnavailable`` when libvirtd is, ``VirtError``
(with libvirt's message and ``VIR_ERR_*`` code) otherwise. The driver composes
them; none of them touches secrets or Barbican.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import libvirt
from oslo_log import log as logging

from vtpm_driver import exception
from vtpm_driver.model.request import show
from vtpm_driver.model.server import canonical_uuid
from vtpm_driver.virt import connection

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

# Nova's power_state.STATE_MAP names (what ComputeDriver.get_info reports).
POWER_PENDING = "pending"
POWER_RUNNING = "running"
POWER_PAUSED = "paused"
POWER_SHUTDOWN = "shutdown"
POWER_CRASHED = "crashed"
POWER_SUSPENDED = "suspended"

# Nova's libvirt driver maps "shutting down" to RUNNING: the guest still runs.
_POWER_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: POWER_PENDING,
    libvirt.VIR_DOMAIN_RUNNING: POWER_RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: POWER_RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: POWER_PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: POWER_RUNNING,
    libvirt.VIR_DOMAIN_SHUTOFF: POWER_SHUTDOWN,
    libvirt.VIR_DOMAIN_CRASHED: POWER_CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: POWER_SUSPENDED,
}
#: States in which the guest is running (what a start waits for).
RUNNING_STATES = frozenset({libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED})
#: States a managed save (suspend) accepts.
SUSPENDABLE_STATES = RUNNING_STATES | {libvirt.VIR_DOMAIN_PAUSED}

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


def wait_until_running(dom: libvirt.virDomain, timeout: float) -> None:
    """Wait until a started domain runs (a start can "work" and the guest die at once).

    :raises VirtError: it did not run within ``timeout`` seconds.
    """
    wait_for_state(dom, RUNNING_STATES, timeout)


def is_running(dom: libvirt.virDomain) -> bool:
    """Whether the guest runs (not paused, not shutting off)."""
    return get_state(dom) in RUNNING_STATES


def power_state(dom: libvirt.virDomain) -> str:
    """Nova's power state name of the domain; a managed-saved one is ``suspended``."""
    current = get_state(dom)
    if current == libvirt.VIR_DOMAIN_SHUTOFF and has_managed_save(dom):
        return POWER_SUSPENDED
    return _POWER_STATES.get(current, POWER_PENDING)


def has_managed_save(dom: libvirt.virDomain) -> bool:
    """Whether the domain was suspended to disk (libvirt managed save)."""
    try:
        return bool(dom.hasManagedSaveImage(0))
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, f"check saved state of {_label(dom)}") from exc


def discard_managed_save(dom: libvirt.virDomain) -> None:
    """Drop a managed-save image, if any (idempotent): the next start boots afresh."""
    try:
        if dom.hasManagedSaveImage(0):
            dom.managedSaveRemove(0)
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, f"discard saved state of {_label(dom)}") from exc


def managed_save(dom: libvirt.virDomain) -> None:
    """Suspend to disk: memory (and swtpm's state) saved, the guest stopped.

    Only a domain in :data:`SUSPENDABLE_STATES` can be saved.

    :raises VirtError: libvirt refused.
    """
    try:
        dom.managedSave(0)
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, f"suspend {_label(dom)}") from exc


def reboot(dom: libvirt.virDomain) -> None:
    """Ask the guest to reboot (ACPI); swtpm keeps running, no secret is needed.

    :raises VirtError: libvirt or the guest refused (the caller may reboot hard).
    """
    try:
        dom.reboot(0)
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, f"reboot {_label(dom)}") from exc


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


def remove(dom: libvirt.virDomain, keep_tpm: bool = False) -> bool:
    """Remove the domain: pull the plug if it runs, then undefine it.

    Its managed save image and NVRAM go with it; its swtpm state goes too
    unless ``keep_tpm`` (Nova's hard reboot and revert define it again with
    the same UUID). True if there was a domain to remove, False if it was
    already gone, so a second call is a no-op. The domain's vTPM libvirt
    secret and the state directory under ``[vtpm] swtpm_state_dir`` are not
    the domain's: :mod:`vtpm_driver.ops` removes them when the server goes.
    """
    try:
        was_running = destroy(dom)
    except exception.InstanceNotFound:
        return False
    # A transient domain is gone once it stops: nothing left to undefine.
    return undefine(dom, keep_tpm) or was_running


def lookup(conn: libvirt.virConnect, name_or_uuid: str) -> libvirt.virDomain:
    """The domain with this UUID or name (UUID first, as ``virsh`` does).

    :raises InstanceNotFound: none has it.
    """
    if not isinstance(name_or_uuid, str) or not name_or_uuid:
        raise exception.InstanceNotFound(f"no server named {show(name_or_uuid)}")
    canonical = canonical_uuid(name_or_uuid)
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
