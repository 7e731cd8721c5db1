"""Power operations of a server with a vTPM: reboot, stop/start, suspend/resume (SPEC F2, F5).

Every start needs the passphrase in libvirt for the moment swtpm reads it;
it is fetched BEFORE the guest is touched
(:func:`vtpm_driver.ops.secrets.prepare_start`), so a caller who may not read
it leaves the server as it was (F5). ``host`` mode uses the persistent libvirt
secret with no Barbican call. A soft reboot, a power-off and a suspend need no
secret: swtpm keeps running or saves its (encrypted) state.
"""

from __future__ import annotations

from typing import Any

from oslo_log import log as logging

from vtpm_driver import exception, faults
from vtpm_driver.model import request, rules
from vtpm_driver.model.server import server_label
from vtpm_driver.ops.guests import DEFAULT_RETRY_INTERVAL, Guests
from vtpm_driver.virt import domains, guest

LOG = logging.getLogger(__name__)

REBOOT_TYPES = ("SOFT", "HARD")


class PowerOps:
    """reboot, power_off/on, suspend/resume, get_info over :class:`Guests`."""

    def __init__(self, guests: Guests) -> None:
        self.guests = guests

    def __repr__(self) -> str:
        return f"PowerOps({self.guests!r})"

    def reboot(self, context: Any, instance: Any, reboot_type: str) -> None:
        """SOFT: ACPI reboot, swtpm keeps running (no secret); HARD: full restart (F2).

        :raises VTPMError: unknown ``reboot_type``.
        """
        if reboot_type not in REBOOT_TYPES:
            raise exception.VTPMError(
                f"invalid reboot_type={request.show(reboot_type)}: allowed values are "
                f"{', '.join(REBOOT_TYPES)}"
            )
        dom = self.guests.lookup(instance)
        if reboot_type == "SOFT" and self._soft_reboot(dom, instance):
            return
        self.hard_reboot(context, instance, dom)

    @staticmethod
    def _soft_reboot(dom: Any, instance: Any) -> bool:
        """libvirt's ACPI reboot; False when it cannot be done (then reboot hard)."""
        if not guest.is_running(dom):
            return False
        try:
            guest.reboot(dom)
        except exception.InstanceNotFound:
            raise
        except exception.VirtError as exc:
            LOG.warning("Soft reboot failed (%s); rebooting hard", exc,
                        instance_uuid=instance.uuid)
            return False
        LOG.info("Soft reboot requested", instance_uuid=instance.uuid)
        return True

    def hard_reboot(self, context: Any, instance: Any, dom: Any = None) -> None:
        """Power off, redefine (TPM state kept), start with a fresh secret (F2).

        The passphrase is fetched before the guest is touched. The domain is
        redefined in place (``defineXML`` on its UUID) rather than undefined
        with ``KEEP_TPM`` and defined again: same result, but the server never
        disappears from libvirt, which is its only record.
        """
        cfg = rules.vtpm_of(instance)
        dom = dom if dom is not None else self.guests.lookup(instance)
        start = self.guests.prepare_start(context, instance, cfg)
        faults.point("reboot.after_secret_fetch")
        xml = self.guests.domain_xml(instance, cfg)
        guest.destroy(dom)
        faults.point("reboot.after_destroy")
        guest.discard_managed_save(dom)
        dom = guest.define(self.guests.conn, xml)
        faults.point("reboot.after_define")
        self.guests.launch(dom, instance, start)
        LOG.info("Hard rebooted", instance_uuid=instance.uuid)

    def power_off(self, instance: Any, timeout: float = 0, retry_interval: float = 0) -> None:
        """Stop the guest: ACPI first when ``timeout`` > 0, then pull the plug."""
        dom = self.guests.lookup(instance)
        guest.power_off(dom, graceful=timeout > 0, timeout=float(timeout),
                        retry_interval=float(retry_interval or DEFAULT_RETRY_INTERVAL))
        LOG.info("Powered off", instance_uuid=instance.uuid)

    def power_on(self, context: Any, instance: Any) -> None:
        """Start a stopped server; a suspended one is resumed, a running one left alone."""
        dom = self.guests.lookup(instance)
        if guest.is_active(dom):
            LOG.info("Already running", instance_uuid=instance.uuid)
            return
        if guest.has_managed_save(dom):
            self.resume(context, instance)
            return
        self.hard_reboot(context, instance, dom)

    def suspend(self, instance: Any) -> None:
        """libvirt managed save: memory and TPM state go to disk, the guest stops.

        :raises VirtError: the server is not running (or paused).
        """
        dom = self.guests.lookup(instance)
        current = guest.get_state(dom)
        if current not in guest.SUSPENDABLE_STATES:
            raise exception.VirtError(
                f"cannot suspend server {server_label(instance)}: it is "
                f"{guest.state_name(current)}"
            )
        guest.managed_save(dom)
        LOG.info("Suspended", instance_uuid=instance.uuid)

    def resume(self, context: Any, instance: Any) -> None:
        """Restore a suspended server; needs the passphrase like any start (F2)."""
        cfg = rules.vtpm_of(instance)
        dom = self.guests.lookup(instance)
        if guest.is_active(dom):
            LOG.info("Already running", instance_uuid=instance.uuid)
            return
        start = self.guests.prepare_start(context, instance, cfg)
        faults.point("resume.after_secret_fetch")
        self.guests.launch(dom, instance, start, fresh_boot=not guest.has_managed_save(dom))
        LOG.info("Resumed", instance_uuid=instance.uuid)

    def get_info(self, instance: Any) -> str:
        """Nova's power state name: running, paused, shutdown, suspended, crashed, pending."""
        return guest.power_state(self.guests.lookup(instance))

    def list_instances(self) -> list[str]:
        """Names of this host's servers (domains carrying our server record)."""
        return [server.name for _dom, server in domains.list_servers(self.guests.conn)]
