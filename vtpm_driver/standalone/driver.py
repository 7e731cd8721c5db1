"""VTPMDriver: the Nova ``ComputeDriver``-shaped entry point of vtpm-driver.

Method names and arguments follow Nova's ``ComputeDriver``. The driver stays
thin: decisions live in the pure modules (:mod:`vtpm_driver.model.request`,
:mod:`vtpm_driver.model.rules`, :mod:`vtpm_driver.model.hostcheck`), and this class maps their
findings to the errors Nova expects at start-up.

Lifecycle methods delegate to the orchestration in :mod:`vtpm_driver.ops`:
:class:`~vtpm_driver.ops.lifecycle.LifecycleOps` (spawn, delete),
:class:`~vtpm_driver.ops.power.PowerOps` (reboot, power, suspend/resume),
:class:`~vtpm_driver.ops.resize.ResizeOps` (resize) and
:class:`~vtpm_driver.ops.rebuild.RebuildOps` (rebuild, rescue), all over one
:class:`~vtpm_driver.ops.guests.Guests`, each under the server's lock
(:meth:`VTPMDriver.server_operation`). Arguments Nova passes that a
standalone host has no use for (networks, block devices, accelerators, shares)
are accepted and ignored.

The driver manages the servers of ONE libvirt host (``[libvirt]
connection_uri``). Nothing here moves a server to another host: cold and live
migration, shelve/unshelve and evacuation are Nova's (the shim in
``nova/virt/vtpm/`` calls the steps of :mod:`vtpm_driver.ops.migrate` and
:mod:`vtpm_driver.ops.shelve` around Nova's own moves).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception, keymgr
from vtpm_driver.keymgr import KeyManagerAPI
from vtpm_driver.model.hostcheck import HostProbe, HostReport, check_host
from vtpm_driver.model.request import UNPARSED, Unparsed, VTPMConfig
from vtpm_driver.ops import journal, locks
from vtpm_driver.ops.backup import ResizeBackups
from vtpm_driver.ops.guests import Guests
from vtpm_driver.ops.lifecycle import LifecycleOps
from vtpm_driver.ops.power import PowerOps
from vtpm_driver.ops.rebuild import RebuildOps
from vtpm_driver.ops.recovery import Recovery
from vtpm_driver.ops.resize import ResizeOps
from vtpm_driver.virt import connection, domains
from vtpm_driver.virt.probe import LibvirtHostProbe

LOG = logging.getLogger(__name__)


class VTPMDriver:
    """vTPM support for the libvirt guests of one host, with Barbican-held passphrases."""

    def __init__(self, conf: cfg.ConfigOpts, probe: HostProbe | None = None,
                 hypervisor: Any = None, keymgr: KeyManagerAPI | None = None) -> None:
        """``probe``, ``hypervisor`` (anything with a libvirt ``conn`` attribute) and
        ``keymgr`` default to the real ones, created on first use; tests inject fakes."""
        self.conf = conf
        self._probe = probe
        self._hypervisor = hypervisor
        self._keymgr = keymgr
        self._host_report_cache: HostReport | None = None
        self._guests: Guests | None = None
        self._lifecycle: LifecycleOps | None = None
        self._power: PowerOps | None = None
        self._resize: ResizeOps | None = None
        self._recovery: Recovery | None = None

    @property
    def probe(self) -> HostProbe:
        """What the host offers; the real libvirt probe unless one was injected."""
        if self._probe is None:
            self._probe = LibvirtHostProbe.from_conf(self.conf)
        return self._probe

    @property
    def hypervisor(self) -> Any:
        """The libvirt connection holder (:class:`~vtpm_driver.virt.connection.Hypervisor`)."""
        if self._hypervisor is None:
            self._hypervisor = connection.Hypervisor(vtpm_conf.libvirt_uri(self.conf))
        return self._hypervisor

    @property
    def key_manager(self) -> KeyManagerAPI:
        """Barbican access (:class:`~vtpm_driver.keymgr.KeyManager`)."""
        if self._keymgr is None:
            self._keymgr = keymgr.KeyManager(self.conf)
        return self._keymgr

    @property
    def state_base(self) -> str:
        """This host's swtpm state directory (``[vtpm] swtpm_state_dir``), for every
        operation of this driver (guests, resize backups, rebuild, state backups).
        Asked when an operation needs it, never cached (the configuration may be
        reloaded)."""
        return str(self.conf.vtpm.swtpm_state_dir)

    @property
    def guests(self) -> Guests:
        """This host's guests, shared by every operation."""
        if self._guests is None:
            self._guests = Guests(self.conf, self.hypervisor, self.key_manager,
                                  self._host_report, state_base=lambda: self.state_base)
        return self._guests

    @property
    def lifecycle(self) -> LifecycleOps:
        if self._lifecycle is None:
            self._lifecycle = LifecycleOps(self.guests)
        return self._lifecycle

    @property
    def power(self) -> PowerOps:
        if self._power is None:
            self._power = PowerOps(self.guests)
        return self._power

    @property
    def resize_ops(self) -> ResizeOps:
        if self._resize is None:
            backups = ResizeBackups(self.conf.vtpm.resize_backup_dir, _StateBase(self))
            self._resize = ResizeOps(self.guests, backups)
        return self._resize

    @property
    def recovery(self) -> Recovery:
        """Finishes or rolls back interrupted operations (the journal)."""
        if self._recovery is None:
            self._recovery = Recovery(self.guests, self.resize_ops)
        return self._recovery

    @contextlib.contextmanager
    def server_operation(self, context: Any, instance: Any, operation: str, *,
                         refresh: bool = True) -> Iterator[journal.Decision | None]:
        """Hold the server's lock for ``operation``; first bring ``instance`` up to date
        with its record (``refresh``: all of it; else only the journal entry, for
        the resize steps whose caller sets the flavors) and finish or roll back an
        operation the server's journal says was interrupted (yields that decision).

        :raises ServerLocked: another operation holds the server past ``[vtpm] lock_timeout``.
        :raises VTPMError: the interrupted operation could not be finished or rolled back.
        """
        with locks.server_lock(self.conf, instance.uuid, operation):
            decision = None
            if self.guests.find(instance) is not None:
                decision = self.recovery.recover(context, instance, refresh_whole=refresh)
            yield decision

    def recover(self, context: Any, instance: Any) -> journal.Decision | None:
        """Finish or roll back an operation the server's journal says was interrupted,
        under the server lock (what ``vtpm-driver audit --repair`` and the next
        operation do); None when there was none. Idempotent.

        :raises ServerLocked: an operation is running on the server (then it is
            not interrupted).
        :raises VTPMError: it could not be finished or rolled back (the entry stays).
        """
        with self.server_operation(context, instance, "repair") as decision:
            return decision

    def _host_report(self) -> HostReport:
        """What this host offers, computed once (spawn and resize check it)."""
        if self._host_report_cache is None:
            self._host_report_cache = check_host(self.conf, self.probe)
        return self._host_report_cache

    # -- Start-up and scheduling ------------------------------------------

    def init_host(self, host: str | None = None) -> None:
        """Refuse to start on a host that cannot honour its vTPM configuration.

        SPEC C2: with ``swtpm_enabled`` every problem found is listed in one
        ``InvalidConfiguration``. SPEC C4: without it, vTPM servers already on
        this host would lose their TPM, so start-up is refused as well.

        :raises InvalidConfiguration: see above.
        :raises HypervisorUnavailable: libvirt cannot be reached.
        """
        report = check_host(self.conf, self.probe)
        if self.conf.libvirt.swtpm_enabled:
            if report.problems:
                raise exception.InvalidConfiguration(
                    "[libvirt] swtpm_enabled is True but this host cannot provide emulated "
                    f"TPMs: {'; '.join(report.problems)}. Fix the above, or set "
                    "[libvirt] swtpm_enabled = False"
                )
            LOG.info("Emulated TPM support enabled on %s: %s", host or "this host",
                     ", ".join(sorted(t for t, ok in report.traits.items() if ok)))
            return
        servers = self._vtpm_servers_on_host()
        if servers:
            raise exception.InvalidConfiguration(
                f"this host has {len(servers)} server(s) with a vTPM "
                f"({', '.join(sorted(servers))}) but [libvirt] swtpm_enabled is False: "
                "set swtpm_enabled = True so they keep their TPM"
            )

    def get_traits(self) -> dict[str, bool]:
        """Every TPM trait (Nova's seven and the PCR bank ones), True only when usable here."""
        return dict(check_host(self.conf, self.probe).traits)

    def _vtpm_servers_on_host(self) -> list[str]:
        """UUIDs of this driver's servers on this host that have an emulated TPM (SPEC C4).

        Only the domains the driver manages (those carrying its server record)
        count: a domain another tool defined is not the driver's to protect, and
        must not keep it from starting (issue 13 item 8).
        """
        return domains.managed_tpm_emulator_domains(self.hypervisor.conn)

    # -- Lifecycle ------------------------------------------------------------

    def spawn(self, context: Any, instance: Any, image_meta: Any, injected_files: Any,
              admin_password: Any, allocations: Any, network_info: Any = None,
              block_device_info: Any = None, power_on: bool = True,
              accel_info: Any = None,
              vtpm: VTPMConfig | Unparsed | None = UNPARSED) -> None:
        """Create and (with ``power_on``) start the server (F1, G3).

        ``vtpm``: the server's request as the caller already parsed it (the
        standalone service does, before logging in); by default it is parsed
        from the instance here.
        """
        with locks.server_lock(self.conf, instance.uuid, "create"):
            self.lifecycle.spawn(context, instance, image_meta, power_on=power_on, vtpm=vtpm)

    def destroy(self, context: Any, instance: Any, network_info: Any = None,
                block_device_info: Any = None, destroy_disks: bool = True,
                destroy_secrets: bool = True) -> None:
        """Delete the server, its TPM state and secrets (F3); idempotent.

        Waits for (or is refused by, :class:`~vtpm_driver.exception.ServerLocked`)
        another operation on the server. An interrupted one is not finished
        first: everything it left goes with the server.
        """
        with locks.server_lock(self.conf, instance.uuid, "delete"):
            self.recovery.refresh(instance)
            self.lifecycle.destroy(context, instance, destroy_disks=destroy_disks,
                                   destroy_secrets=destroy_secrets)
            if destroy_disks:
                self.recovery.remove_leftovers(instance)
                self.resize_ops.discard_backup(instance.uuid)

    def reboot(self, context: Any, instance: Any, network_info: Any, reboot_type: str,
               block_device_info: Any = None, bad_volumes_callback: Any = None,
               accel_info: Any = None, share_info: Any = None) -> None:
        """``SOFT`` (ACPI, falls back to hard) or ``HARD`` reboot (F2)."""
        with self.server_operation(context, instance, f"{reboot_type.lower()} reboot"):
            self.power.reboot(context, instance, reboot_type)

    def power_off(self, instance: Any, timeout: float = 0, retry_interval: float = 0) -> None:
        """Stop the guest (ACPI for up to ``timeout`` seconds, then hard)."""
        with self.server_operation(None, instance, "stop"):
            self.power.power_off(instance, timeout, retry_interval)

    def power_on(self, context: Any, instance: Any, network_info: Any,
                 block_device_info: Any = None, accel_info: Any = None,
                 share_info: Any = None) -> None:
        """Start a stopped server (the passphrase is fetched first, F2/F5)."""
        with self.server_operation(context, instance, "start"):
            self.power.power_on(context, instance)

    def suspend(self, context: Any, instance: Any) -> None:
        """Save the guest's memory and TPM state to disk (libvirt managed save)."""
        with self.server_operation(context, instance, "suspend"):
            self.power.suspend(instance)

    def resume(self, context: Any, instance: Any, network_info: Any,
               block_device_info: Any = None, share_info: Any = None) -> None:
        """Restore a suspended guest (needs the passphrase, F2)."""
        with self.server_operation(context, instance, "resume"):
            self.power.resume(context, instance)

    def get_info(self, instance: Any, use_cache: bool = True) -> str:
        """Power state: ``running``, ``paused``, ``shutdown``, ``suspended``, ``crashed``
        or ``pending`` (Nova's power_state names)."""
        return self.power.get_info(instance)

    def list_instances(self) -> list[str]:
        """Names of the servers on this host."""
        return self.power.list_instances()

    def migrate_disk_and_power_off(self, context: Any, instance: Any, dest: str | None,
                                   flavor: Any, network_info: Any,
                                   block_device_info: Any = None, timeout: float = 0,
                                   retry_interval: float = 0) -> str:
        """Resize step 1 (``flavor`` is the new one): check, stop, back up TPM state."""
        with self.server_operation(context, instance, "resize"):
            return self.resize_ops.migrate_disk_and_power_off(context, instance, dest, flavor,
                                                              timeout, retry_interval)

    def finish_migration(self, context: Any, migration: Any, instance: Any, disk_info: Any,
                         network_info: Any, image_meta: Any, resize_instance: bool,
                         allocations: Any, block_device_info: Any = None,
                         power_on: bool = True) -> None:
        """Resize step 2 (``instance.flavor`` is the new one): redefine and start."""
        with self.server_operation(context, instance, "resize", refresh=False):
            self.resize_ops.finish_migration(context, instance, image_meta, power_on=power_on)

    def confirm_migration(self, context: Any, migration: Any, instance: Any,
                          network_info: Any) -> None:
        """Resize step 3a: keep the new flavor, drop the backup (and a removed vTPM's secret)."""
        with self.server_operation(context, instance, "confirm resize",
                                   refresh=False) as recovered:
            if recovered is not None and recovered.redo == journal.RESIZE_CONFIRM:
                return  # the interrupted confirm was just finished
            self.resize_ops.confirm_migration(context, instance)

    def finish_revert_migration(self, context: Any, instance: Any, network_info: Any,
                                migration: Any, block_device_info: Any = None,
                                power_on: bool = True) -> None:
        """Resize step 3b: old flavor, old TPM state, old secret."""
        with self.server_operation(context, instance, "revert resize",
                                   refresh=False) as recovered:
            if recovered is not None and (recovered.revert_resize
                                          or recovered.redo == journal.RESIZE_REVERT):
                if power_on:  # the recovery reverted without a start
                    self.power.power_on(context, instance)
                return
            self.resize_ops.finish_revert_migration(context, instance, power_on=power_on)

    # -- Rebuild and rescue -----------------------------------------------------

    def _rebuild_ops(self) -> RebuildOps:
        return RebuildOps(self.guests, self.state_base)

    def rebuild(self, context: Any, instance: Any, image_meta: Any, injected_files: Any,
                admin_password: Any, allocations: Any, bdms: Any, detach_block_devices: Any,
                attach_block_devices: Any, network_info: Any = None, evacuate: bool = False,
                block_device_info: Any = None, preserve_ephemeral: bool = False,
                accel_uuids: Any = None, reimage_boot_volume: bool = False, *,
                reset_tpm: bool = False) -> None:
        """Boot ``image_meta``'s kernel/initrd/command line (None: the server's own) with
        the same TPM, as a reinstalled machine keeps its TPM (``reset_tpm``: a fresh
        TPM, new EK). Volumes, injected files and passwords do not apply here.

        :raises OperationNotSupportedForVTPM: ``evacuate``: Nova evacuates by a
            rebuild on another host, and this driver manages one host (Nova's
            evacuation goes through the shim).
        :raises VTPMSecretForbidden: ``user`` mode and not the owner (nothing touched).
        :raises VTPMError: rescued or suspended; bad boot files.
        """
        if evacuate:
            raise exception.OperationNotSupportedForVTPM(
                f"cannot evacuate server {instance.name}: the standalone driver manages one "
                "host; evacuation is Nova's (compute_driver = vtpm.VTPMLibvirtDriver)")
        with self.server_operation(context, instance, "rebuild"):
            self._rebuild_ops().rebuild(
                context, instance, kernel=getattr(image_meta, "kernel", None),
                initrd=getattr(image_meta, "initrd", None),
                cmdline=getattr(image_meta, "cmdline", None), reset_tpm=reset_tpm)

    def rescue(self, context: Any, instance: Any, network_info: Any, image_meta: Any,
               rescue_password: Any, block_device_info: Any, share_info: Any = None) -> None:
        """Boot the rescue image (``image_meta``'s boot files; None: the server's own with
        ``vtpm_rescue=1``) with the server's own vTPM; the PCRs differ, so secrets
        sealed to the normal boot stay sealed. No guest agent: ``rescue_password``
        is not used.

        :raises VTPMSecretForbidden: ``user`` mode and not the owner (nothing touched).
        :raises VTPMError: already rescued, or suspended.
        """
        with self.server_operation(context, instance, "rescue"):
            self._rebuild_ops().rescue(
                context, instance, kernel=getattr(image_meta, "kernel", None),
                initrd=getattr(image_meta, "initrd", None),
                cmdline=getattr(image_meta, "cmdline", None))

    def unrescue(self, context: Any, instance: Any) -> None:
        """Back to the normal boot, TPM state kept. :raises VTPMError: not rescued."""
        with self.server_operation(context, instance, "unrescue"):
            self._rebuild_ops().unrescue(context, instance)


class _StateBase(os.PathLike):
    """A driver's :attr:`~VTPMDriver.state_base` as a path for
    :class:`~vtpm_driver.ops.backup.ResizeBackups`, asked each time a path is made
    (the recovery of every operation holds the backups; only steps that need the
    directory ask)."""

    def __init__(self, driver: VTPMDriver) -> None:
        self._driver = driver

    def __fspath__(self) -> str:
        return self._driver.state_base

    def __str__(self) -> str:
        return self._driver.state_base

    def __repr__(self) -> str:
        return f"_StateBase({self._driver.state_base!r})"
