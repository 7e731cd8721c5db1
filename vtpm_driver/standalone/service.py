"""Standalone servers as a service: what the ``server`` commands (and the demo) call.

:class:`ServerService` adds what Nova's API and compute manager add around the
driver of the one host the command line manages (:mod:`vtpm_driver.standalone.backend`):
find the server, check the caller's project
(:func:`vtpm_driver.model.rules.check_project`), validate a request before anything
is created, compute a resize's new flavor (:func:`vtpm_driver.model.rules.new_flavor`),
keep ``[vtpm] state_backup`` copies in step with stops and starts, and describe
a server as plain fields (:mod:`vtpm_driver.standalone.view`). The audit and repair are
:mod:`vtpm_driver.audit`'s (:class:`vtpm_driver.audit.actions.AuditActions`,
given this service's backend). Command-line modules only parse options, call
one method here and format the result.

Nothing here moves a server to another host: cold and live migration,
shelve/unshelve and evacuation are Nova's, through the shim.

Every error is a :class:`~vtpm_driver.exception.VTPMError` naming the server
and the reason; nothing here prints.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import exception, statestore
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model import firmware, request, rules, windows
from vtpm_driver.model.request import UNPARSED, Unparsed, VTPMConfig
from vtpm_driver.ops import locks
from vtpm_driver.ops.rebuild import RebuildOps
from vtpm_driver.ops.shelve import OffHostOps, Site
from vtpm_driver.standalone import view

LOG = logging.getLogger(__name__)

SHUTDOWN_RETRY_INTERVAL = 10  # seconds between ACPI power-button presses

#: Operations still refused for vTPM servers (SPEC F6): none since issue 15.
REFUSED_OPERATIONS: tuple[str, ...] = ()

Progress = Callable[[str], contextlib.AbstractContextManager[None]]


def _no_progress(_message: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _abspath(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


# --------------------------------------------------------------------------- the service


class ServerService:
    """Create, inspect and drive the servers of one host as the caller of ``context``.

    ``context`` is called when an operation first needs the caller (so
    read-only operations and refused requests never log in); ``progress(msg)``
    wraps each slow step (the command line shows it on a terminal). The
    backend is connected on first use and closed by :meth:`close`.
    """

    def __init__(self, conf: cfg.ConfigOpts, backend: Any,
                 context: Callable[[], RequestContext],
                 progress: Progress = _no_progress) -> None:
        self.conf = conf
        self._backend = backend
        self._context = context
        self._progress = progress
        self._connected = False

    @property
    def backend(self) -> Any:
        """The backend of the host, connected on first use."""
        if not self._connected:
            with self._progress(f"Connecting to libvirt at {self._backend.uri}"):
                self._backend.connect()
            self._connected = True
        return self._backend

    def close(self) -> None:
        self._backend.close()

    # -- reading ---------------------------------------------------------------

    def power_state(self, instance: Any) -> str:
        """Nova's power state name; 'deleted' or 'unknown' rather than an error."""
        try:
            return view.power_state_name(self.backend.driver.get_info(instance))
        except exception.InstanceNotFound:
            return "deleted"
        except exception.VTPMError as exc:
            LOG.warning("Cannot get the power state of server %s: %s",
                        getattr(instance, "name", "?"), exc)
            return "unknown"

    def describe(self, instance: Any,
                 vtpm: VTPMConfig | Unparsed | None = UNPARSED) -> dict[str, Any]:
        """:func:`.view.server_fields` with the live power state and resize status."""
        return view.server_fields(instance, self.power_state(instance),
                                  self.backend.resize_pending(instance), vtpm)

    def show(self, name_or_uuid: str) -> dict[str, Any]:
        """:raises InstanceNotFound: no such server."""
        return self.describe(self.backend.find(name_or_uuid))

    def list(self) -> list[dict[str, Any]]:
        """Every server of the host, sorted by name (no credentials needed)."""
        return [view.summary_fields(instance, self.power_state(instance))
                for instance in self.backend.list()]

    # -- creating ----------------------------------------------------------------

    def create(self, name: str, *, flavor_extra_specs: Mapping[str, str],
               image_properties: Mapping[str, str], kernel: str | None = None,
               initrd: str | None = None, cmdline: str | None = None,
               disk: str | None = None, vcpus: int = 1, memory_mb: int = 256,
               console_log: str | None = None) -> dict[str, Any]:
        """Create a server owned by the caller, start it, and describe it.

        The request is checked before the caller logs in and before anything
        is created (SPEC A6), once: the parsed request goes on to the new
        instance and the driver's spawn. Boot file paths are made absolute.

        :raises InvalidVTPMConfig: bad or conflicting vTPM properties, or a
            Windows 11 image on a request Windows 11 would not accept.
        :raises InvalidFirmwareRequest: firmware that cannot be given (bad
            ``hw_firmware_type`` or Secure Boot values, Secure Boot without UEFI
            or for a kernel booted directly).
        :raises InstanceExists: a server of that name exists.
        """
        vtpm = request.get_vtpm_config(dict(flavor_extra_specs), dict(image_properties))
        windows.check(dict(flavor_extra_specs), dict(image_properties), vtpm)
        firmware.check_boot(firmware.get_firmware(flavor_extra_specs, image_properties),
                            direct_kernel=kernel is not None)
        context = self._context()
        backend = self.backend
        try:
            existing = backend.find(name)
        except exception.InstanceNotFound:
            existing = None
        if existing is not None:
            raise exception.InstanceExists(
                f"a server named {name!r} already exists on this host (uuid {existing.uuid})")
        instance = backend.new_instance(
            name, context, flavor_extra_specs=dict(flavor_extra_specs),
            image_properties=dict(image_properties), kernel=_abspath(kernel),
            initrd=_abspath(initrd), cmdline=cmdline, disk=_abspath(disk), vcpus=vcpus,
            memory_mb=memory_mb, console_log=_abspath(console_log), vtpm=vtpm)
        with self._progress(f"Creating and starting server {name}"):
            backend.driver.spawn(context, instance, instance.image_meta, [], None, {},
                                 vtpm=vtpm)
        return self.describe(instance, vtpm)

    # -- lifecycle -----------------------------------------------------------------

    def _target(self, name_or_uuid: str, verb: str) -> tuple[RequestContext, Any]:
        """The caller (logged in first) and the server, which the caller may act on."""
        context = self._context()
        instance = self.backend.find(name_or_uuid)
        rules.check_project(context, instance, verb)
        return context, instance

    def _power(self, name_or_uuid: str, verb: str, doing: str,
               call: Callable[[Any, RequestContext, Any], None], detail: str = "") -> None:
        """One power action: the server (the caller may act on it), ``call(driver,
        context, instance)`` under a progress line, then its off-host copy kept in
        step: a stop or suspend may refresh it, anything that starts it makes it stale."""
        context, instance = self._target(name_or_uuid, verb)
        with self._progress(f"{doing} server {instance.name}{detail}"):
            call(self.backend.driver, context, instance)
        if verb in ("stop", "suspend"):
            self.after_event(instance, verb)
        else:
            self.after_start(instance)

    def reboot(self, name_or_uuid: str, hard: bool = False) -> None:
        """Soft (guest) or hard (power cycle; unlocks the vTPM again) reboot."""
        kind = "HARD" if hard else "SOFT"
        self._power(name_or_uuid, "reboot", "Rebooting",
                    lambda drv, ctx, inst: drv.reboot(ctx, inst, None, kind),
                    f" ({kind.lower()})")

    def stop(self, name_or_uuid: str, timeout: int) -> None:
        """Ask the guest to shut down, power off after ``timeout`` s (0: at once)."""
        retry = SHUTDOWN_RETRY_INTERVAL if timeout else 0
        self._power(name_or_uuid, "stop", "Stopping", lambda drv, _ctx, inst: drv.power_off(
            inst, timeout=timeout, retry_interval=retry))

    def start(self, name_or_uuid: str) -> None:
        self._power(name_or_uuid, "start", "Starting",
                    lambda drv, ctx, inst: drv.power_on(ctx, inst, None))

    def suspend(self, name_or_uuid: str) -> None:
        self._power(name_or_uuid, "suspend", "Suspending",
                    lambda drv, ctx, inst: drv.suspend(ctx, inst))

    def resume(self, name_or_uuid: str) -> None:
        self._power(name_or_uuid, "resume", "Resuming",
                    lambda drv, ctx, inst: drv.resume(ctx, inst, None))

    def delete(self, name_or_uuid: str) -> None:
        """Domain, swtpm state, libvirt secret, Barbican secret and off-host copy.

        :raises InstanceNotFound: the server does not exist (a second delete).
        """
        context, instance = self._target(name_or_uuid, "delete")
        with self._progress(f"Deleting server {instance.name}"):
            self.backend.driver.destroy(context, instance, None, None, True, True)
            self.store.delete(instance.uuid)

    # -- resize ------------------------------------------------------------------------

    def resize(self, name_or_uuid: str, *, set_specs: Mapping[str, str],
               unset: Sequence[str] = (), vcpus: int | None = None,
               memory_mb: int | None = None) -> None:
        """Move the server to its flavor with these changes; then confirm or revert.

        :raises VTPMError: a resize is pending (:meth:`_check_nothing_pending`).
        :raises InvalidVTPMConfig: the new flavor (with the image) is invalid;
            nothing is changed.
        """
        context, instance = self._target(name_or_uuid, "resize")
        backend = self.backend
        # One hold of the server's lock across both steps (each re-enters it), the
        # server re-read from its record first: nothing runs between the steps.
        with self._held(context, instance, "resize"):
            flavor = rules.new_flavor(instance.flavor, set_specs, unset, vcpus, memory_mb)
            rules.vtpm_of(instance, flavor=flavor)
            with self._progress(f"Resizing server {instance.name}"):
                # What Nova's compute manager does between the driver's two steps.
                disk_info = backend.driver.migrate_disk_and_power_off(
                    context, instance, None, flavor, None)
                instance.old_flavor, instance.new_flavor = instance.flavor, flavor
                instance.flavor = flavor
                backend.driver.finish_migration(
                    context, None, instance, disk_info, None, instance.image_meta, True, {},
                    None, True)

    @contextlib.contextmanager
    def _held(self, context: RequestContext, instance: Any, operation: str, *,
              settled: bool = True) -> Iterator[None]:
        """The server's lock for ``operation``, with ``instance`` re-read from its record
        under it (and an interrupted operation finished), for checks that must see
        what another command changed while this one waited (issue 13: the soak's
        races); every driver call made inside re-enters the lock. ``settled``
        (all but confirm/revert, which decide what is pending): nothing may await
        confirm or revert (:meth:`_check_nothing_pending`, asked under the lock).

        :raises ServerLocked: another operation holds it past ``[vtpm] lock_timeout``.
        :raises InstanceNotFound: the server was deleted meanwhile.
        :raises VTPMError: ``settled`` and a resize is pending.
        """
        with self.backend.driver.server_operation(context, instance, operation):
            if not self.backend.domain_exists(instance.uuid):
                raise exception.InstanceNotFound(
                    f"no server with name or UUID {instance.name!r} on this host any more: "
                    f"it was deleted while this command waited to {operation} it")
            if settled:
                self._check_nothing_pending(instance, operation)
            yield

    def _decide(self, name_or_uuid: str, confirm: bool) -> None:
        """Confirm or revert the resize pending on the server.

        What is pending is asked under the server's lock, on the record re-read
        there: checked before, a resize decided and another one started meanwhile
        would be confirmed or reverted with the stale record (the new resize's
        flavor overwritten, a removed or added vTPM's secret left in Barbican).

        :raises VTPMError: nothing awaits confirm or revert.
        """
        verb = "confirm the resize of" if confirm else "revert the resize of"
        context, instance = self._target(name_or_uuid, verb)
        with self._held(context, instance, verb, settled=False):
            if not self.backend.resize_pending(instance):
                raise exception.VTPMError(
                    f"cannot {verb} server {instance.name!r}: it has no resize awaiting "
                    "confirm or revert")
            drv = self.backend.driver
            if confirm:
                with self._progress(f"Confirming the resize of server {instance.name}"):
                    drv.confirm_migration(context, None, instance, None)
            else:
                with self._progress(f"Reverting the resize of server {instance.name}"):
                    drv.finish_revert_migration(context, instance, None, None, None, True)

    def confirm_resize(self, name_or_uuid: str) -> None:
        """Keep the new flavor (drops the old vTPM state)."""
        self._decide(name_or_uuid, confirm=True)

    def revert_resize(self, name_or_uuid: str) -> None:
        """Back to the old flavor and its vTPM state."""
        self._decide(name_or_uuid, confirm=False)

    def _check_nothing_pending(self, instance: Any, verb: str) -> None:
        """Refuse ``verb`` while a resize of the server awaits confirm or revert: the
        one rule for a resize, a rescue, an unrescue and a rebuild (as Nova, which
        allows none of them in VERIFY_RESIZE). :meth:`_held` asks it under the
        server's lock, on the re-read record.

        :raises VTPMError: naming the command that decides the pending resize.
        """
        if self.backend.resize_pending(instance):
            raise exception.VTPMError(
                f"cannot {verb} server {instance.name!r}: a resize is awaiting confirm or "
                f"revert; run 'vtpm-driver server resize confirm|revert {instance.name}' first")

    # -- rescue / rebuild -------------------------------------------------------------
    # Each holds the server's lock through :meth:`_held` (the record re-read there: a
    # resize confirmed while the command waited changed the flavor, the image and the
    # secret) and makes every check under it (:meth:`_check_nothing_pending`).

    def _rebuild_ops(self) -> RebuildOps:
        drv = self.backend.driver
        return RebuildOps(drv.guests, drv.state_base)

    def rescue(self, name_or_uuid: str, *, kernel: str | None = None,
               initrd: str | None = None, cmdline: str | None = None) -> None:
        """Boot the rescue image with the server's own vTPM.

        :raises VTPMSecretForbidden: other boot files than the server's own,
            and the caller is neither its owner nor an admin of its project
            (:func:`vtpm_driver.model.rules.check_may_replace_tpm_or_boot`, every
            mode; nothing touched).
        :raises VTPMError: already rescued, suspended, or a resize awaits confirm
            or revert.
        """
        context, instance = self._target(name_or_uuid, "rescue")
        with self._held(context, instance, "rescue"):
            if rules.boots_foreign_files(instance.image_meta, kernel, initrd, cmdline):
                rules.check_may_replace_tpm_or_boot(
                    context, instance, "rescue with other boot files")
            with self._progress(f"Rescuing server {instance.name} (same vTPM)"):
                self._rebuild_ops().rescue(context, instance, kernel=kernel, initrd=initrd,
                                           cmdline=cmdline)
        self.after_start(instance)

    def unrescue(self, name_or_uuid: str) -> None:
        """Back to the normal boot, TPM state kept.

        :raises VTPMError: not rescued, or a resize awaits confirm or revert.
        """
        context, instance = self._target(name_or_uuid, "unrescue")
        with self._held(context, instance, "unrescue"):
            with self._progress(f"Unrescuing server {instance.name}"):
                self._rebuild_ops().unrescue(context, instance)
        self.after_start(instance)

    def rebuild(self, name_or_uuid: str, *, kernel: str | None = None,
                initrd: str | None = None, cmdline: str | None = None,
                reset_tpm: bool = False) -> dict[str, Any]:
        """Boot a new image, TPM kept (``reset_tpm``: a fresh TPM, new EK); describes it.

        :raises VTPMSecretForbidden: ``reset_tpm`` or other boot files, and the
            caller is neither the owner nor an admin of its project
            (:func:`vtpm_driver.model.rules.check_may_replace_tpm_or_boot`, every
            mode; nothing touched).
        :raises VTPMError: rescued, suspended, or a resize awaits confirm or revert.
        """
        context, instance = self._target(name_or_uuid, "rebuild")
        with self._held(context, instance, "rebuild"):
            if reset_tpm:
                rules.check_may_replace_tpm_or_boot(context, instance, "rebuild --reset-tpm")
            elif rules.boots_foreign_files(instance.image_meta, kernel, initrd, cmdline):
                rules.check_may_replace_tpm_or_boot(
                    context, instance, "rebuild with other boot files")
            with self._progress(f"Rebuilding server {instance.name}"):
                reset = self._rebuild_ops().rebuild(context, instance, kernel=kernel,
                                                    initrd=initrd, cmdline=cmdline,
                                                    reset_tpm=reset_tpm)
        self.after_start(instance)
        fields = self.describe(instance)
        fields["tpm"] = ("reset: a new TPM (new endorsement key)" if reset
                         else "kept" if rules.has_vtpm(instance) else None)
        return fields

    # -- off-host copies ([vtpm] state_backup) -------------------------------------------

    @property
    def store(self) -> statestore.DirectoryStateStore:
        return statestore.DirectoryStateStore(self.conf.vtpm.state_backup_dir)

    @property
    def offhost(self) -> OffHostOps:
        return OffHostOps(self.store)

    def site(self) -> Site:
        """The host for :class:`~vtpm_driver.ops.shelve.OffHostOps`, named by its libvirt
        URI (what a copy records as its source host)."""
        backend = self.backend
        return Site(backend.uri, backend.driver.guests, backend.state_base)

    def _backup_mode(self) -> str:
        return str(self.conf.vtpm.state_backup)

    def after_event(self, instance: Any, event: str) -> None:
        """A copy after a clean stop or suspend when ``[vtpm] state_backup`` wants one.

        Never fails the operation that just succeeded: a failed copy (or a server
        another operation holds past ``[vtpm] lock_timeout``) is logged.
        """
        if not rules.wants_backup(self._backup_mode(), event) or not rules.has_vtpm(instance):
            return
        try:
            with locks.server_lock(self.conf, instance.uuid, f"state backup after {event}"):
                self.offhost.backup(self.site(), instance, event)
        except exception.VTPMError as exc:
            LOG.error("Could not copy the TPM state off the host after %s: %s", event, exc,
                      instance_uuid=instance.uuid)

    def after_start(self, instance: Any) -> None:
        """The server runs: its copy is no longer current (see :mod:`vtpm_driver.statestore`)."""
        try:
            self.offhost.mark_started(instance.uuid)
        except exception.VTPMError as exc:
            LOG.error("Could not mark the off-host copy as overtaken: %s", exc,
                      instance_uuid=instance.uuid)

    def backup_states(self, names: Sequence[str] = (), *, force: bool = False
                      ) -> list[dict[str, Any]]:
        """``vtpm-driver state backup``: refresh copies (run from cron for ``periodic``).

        Named servers are copied now; otherwise every vTPM server of the host
        whose copy is older than ``[vtpm] state_backup_interval``. Such a run
        (from cron) never stops at one server: a server deleted meanwhile is
        skipped, and one whose copy fails (held past ``[vtpm] lock_timeout``, its
        state unreadable) is logged and returned with ``error`` set, the others
        still copied.

        :raises InvalidConfiguration: no server named and ``state_backup`` is not periodic.
        :raises VTPMError: a named server could not be copied.
        """
        mode = self._backup_mode()
        if not names and mode != "periodic" and not force:
            raise exception.InvalidConfiguration(
                f"[vtpm] state_backup is {mode!r}: set it to 'periodic' for a periodic run, "
                "or name the servers to copy now")
        now, interval = time.time(), float(self.conf.vtpm.state_backup_interval)
        rows = []
        for instance in self.backend.list():
            if names and instance.name not in names and instance.uuid not in names:
                continue
            if not rules.has_vtpm(instance):
                continue
            old = self.store.get(instance.uuid)
            if not names and not force and not rules.backup_due(
                    old.taken_at if old else None, now, interval):
                continue
            row = {"name": instance.name, "uuid": instance.uuid, "running": None,
                   "size": None, "error": None}
            try:
                with locks.server_lock(self.conf, instance.uuid, "state backup"):
                    meta = self.offhost.backup(self.site(), instance,
                                               "manual" if names else "periodic")
            except exception.InstanceNotFound:
                if names:
                    raise
                continue  # deleted since it was listed
            except exception.VTPMError as exc:
                if names:
                    raise
                LOG.error("Could not copy the TPM state of server %s off the host: %s",
                          instance.name, exc, instance_uuid=instance.uuid)
                rows.append({**row, "error": str(exc)})
                continue
            rows.append({**row, "running": meta.server_running, "size": meta.size})
        return rows
