"""Standalone servers as a service: what the ``server`` commands (and the demo) call.

:class:`ServerService` adds what Nova's API and compute manager add around the
driver of each host (:mod:`vtpm_driver.hosts`): find the server on whichever
host has it, check the caller's project (:func:`vtpm_driver.policy.check_project`),
validate a request before anything is created, compute a resize's new flavor
(:func:`vtpm_driver.policy.new_flavor`), move servers between hosts, and
describe a server as plain fields (:mod:`vtpm_driver.view`). Off-host actions
(shelve, evacuate, rescue, rebuild, state backups) and the audit and repair
are mixed in from :mod:`vtpm_driver.service_offhost` and
:mod:`vtpm_driver.service_audit`.
Command-line modules only parse options, call one method here and format the
result.

Every error is a :class:`~vtpm_driver.exception.VTPMError` naming the server
and the reason; nothing here prints.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import exception, policy, spec, view
from vtpm_driver.context import RequestContext
from vtpm_driver.hosts import HostSet
from vtpm_driver.service_audit import AuditActions
from vtpm_driver.service_offhost import OffHostActions

LOG = logging.getLogger(__name__)

SHUTDOWN_RETRY_INTERVAL = 10  # seconds between ACPI power-button presses

#: Operations still refused for vTPM servers (SPEC F6): none since issue 15 (shelve,
#: evacuate, rescue and rebuild are :class:`~vtpm_driver.service_offhost.OffHostActions`).
REFUSED_OPERATIONS: tuple[str, ...] = ()

Progress = Callable[[str], contextlib.AbstractContextManager[None]]


def _no_progress(_message: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _abspath(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


# --------------------------------------------------------------------------- the service


class ServerService(OffHostActions, AuditActions):
    """Create, inspect and drive servers as the caller of ``context``.

    ``context`` is called when an operation first needs the caller (so
    read-only operations and refused requests never log in); ``progress(msg)``
    wraps each slow step (the command line shows it on a terminal). The
    backend is connected on first use and closed by :meth:`close`.
    """

    def __init__(self, conf: cfg.ConfigOpts, backend: Any,
                 context: Callable[[], RequestContext],
                 progress: Progress = _no_progress, hosts: HostSet | None = None,
                 host: str | None = None) -> None:
        """``hosts`` (several hosts): ``backend`` may be None and ``host`` (None: the
        first) is the host commands act on; with an explicit ``host`` servers are
        looked up there only, otherwise on whichever host has them."""
        self.conf = conf
        self._hosts = hosts
        self._explicit_host = host is not None
        if hosts is not None:
            self._host = hosts.check(host) if host is not None else hosts.default
            backend = hosts.backend(self._host)
        else:
            self._host = getattr(backend, "name", None)
        self._backend = backend
        self._context = context
        self._progress = progress
        self._connected: set[int] = set()

    def _connect(self, backend: Any) -> Any:
        if id(backend) not in self._connected:
            with self._progress(f"Connecting to libvirt at {backend.uri}"):
                backend.connect()
            self._connected.add(id(backend))
        return backend

    @property
    def backend(self) -> Any:
        """The backend of the host this command acts on, connected."""
        return self._connect(self._backend)

    @property
    def host(self) -> str | None:
        """The name of the host this command acts on (None: the one unnamed host)."""
        return self._host

    def _hosts_to_search(self) -> list[str]:
        if self._hosts is None or self._explicit_host:
            return [self._host] if self._host else []
        return [self._host, *[n for n in self._hosts.names if n != self._host]]

    def _use(self, name: str) -> Any:
        """Act on host ``name`` from now on (the server was found there)."""
        if self._hosts is not None and name != self._host:
            self._host, self._backend = name, self._hosts.backend(name)
        return self.backend

    def locate(self, name_or_uuid: str) -> Any:
        """The server, on whichever host has it (the command then acts on that host).

        A cold migration awaiting confirm or revert leaves a stopped copy on
        the source: the destination's copy is the server.

        :raises InstanceNotFound: no host has it.
        """
        if self._hosts is None or self._explicit_host or not self._hosts.several:
            return self.backend.find(name_or_uuid)
        found = []
        for name in self._hosts_to_search():
            try:
                found.append((name, self._connect(self._hosts.backend(name)).find(
                    name_or_uuid)))
            except exception.InstanceNotFound:
                continue
            except exception.HypervisorUnavailable as exc:
                LOG.warning("Host %s is unreachable, not searched: %s", name, exc)
        if not found:
            raise exception.InstanceNotFound(
                f"no server with name or UUID {name_or_uuid!r} on any host "
                f"({', '.join(self._hosts.names)})")
        name, instance = next(((n, i) for n, i in found if policy.migrated_from(i)), found[0])
        self._use(name)
        return instance

    def close(self) -> None:
        if self._hosts is not None:
            self._hosts.close()
        else:
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

    def describe(self, instance: Any) -> dict[str, Any]:
        """:func:`vtpm_driver.view.server_fields` with the live power state and resize status."""
        fields = view.server_fields(instance, self.power_state(instance),
                               self.backend.resize_pending(instance)
                               or bool(policy.migrated_from(instance)))
        if self._hosts is not None and self._hosts.several:
            fields["host"] = self._host
        return fields

    def show(self, name_or_uuid: str) -> dict[str, Any]:
        """A server on a host, or a shelved one. :raises InstanceNotFound: no such server."""
        try:
            return self.describe(self.locate(name_or_uuid))
        except exception.InstanceNotFound:
            shelved = self.show_shelved(name_or_uuid)
            if shelved is None:
                raise
            return shelved

    def list(self) -> list[dict[str, Any]]:
        """Every server, sorted by name, with its host (no credentials needed).

        Every configured host unless one was chosen; an unreachable host is
        skipped with a warning. The stopped source copy of a cold migration
        awaiting confirm or revert is not listed (the server is on the destination).
        """
        if self._hosts is None or self._explicit_host or not self._hosts.several:
            rows = [view.summary_fields(instance, self.power_state(instance), self._host)
                    for instance in self.backend.list()]
            return rows + self.shelved_rows([str(r["uuid"]) for r in rows])
        rows = []
        for name in self._hosts.names:
            try:
                instances = self._use(name).list()
            except exception.HypervisorUnavailable as exc:
                LOG.warning("Host %s is unreachable, its servers are not listed: %s",
                            name, exc)
                continue
            rows += [view.summary_fields(instance, self.power_state(instance), name)
                     for instance in instances if not policy.migrating_to(instance)]
        rows += self.shelved_rows([str(r["uuid"]) for r in rows])
        return sorted(rows, key=lambda row: (str(row["name"]), str(row["host"])))

    # -- creating ----------------------------------------------------------------

    def create(self, name: str, *, flavor_extra_specs: Mapping[str, str],
               image_properties: Mapping[str, str], kernel: str | None = None,
               initrd: str | None = None, cmdline: str | None = None,
               disk: str | None = None, vcpus: int = 1, memory_mb: int = 256,
               console_log: str | None = None) -> dict[str, Any]:
        """Create a server owned by the caller, start it, and describe it.

        The request is checked before the caller logs in and before anything
        is created (SPEC A6). Boot file paths are made absolute.

        :raises InvalidVTPMConfig: bad or conflicting vTPM properties.
        :raises InstanceExists: a server of that name exists.
        """
        spec.get_vtpm_config(dict(flavor_extra_specs), dict(image_properties))
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
            memory_mb=memory_mb, console_log=_abspath(console_log))
        with self._progress(f"Creating and starting server {name}"):
            backend.driver.spawn(context, instance, instance.image_meta, [], None, {})
        return self.describe(instance)

    # -- lifecycle -----------------------------------------------------------------

    def _target(self, name_or_uuid: str, verb: str) -> tuple[RequestContext, Any]:
        """The caller (logged in first) and the server, which the caller may act on."""
        context = self._context()
        instance = self.locate(name_or_uuid)
        policy.check_project(context, instance, verb)
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

        A shelved server: its Barbican secret and its off-host copy.

        :raises InstanceNotFound: the server does not exist (a second delete).
        """
        try:
            context, instance = self._target(name_or_uuid, "delete")
        except exception.InstanceNotFound:
            if self.delete_shelved(name_or_uuid):
                return
            raise
        with self._progress(f"Deleting server {instance.name}"):
            self.backend.driver.destroy(context, instance, None, None, True, True)
            self.store.delete(instance.uuid)

    # -- resize ------------------------------------------------------------------------

    def resize(self, name_or_uuid: str, *, set_specs: Mapping[str, str],
               unset: Sequence[str] = (), vcpus: int | None = None,
               memory_mb: int | None = None) -> None:
        """Move the server to its flavor with these changes; then confirm or revert.

        :raises VTPMError: a resize or a move is pending (:meth:`_check_nothing_pending`).
        :raises InvalidVTPMConfig: the new flavor (with the image) is invalid;
            nothing is changed.
        """
        context, instance = self._target(name_or_uuid, "resize")
        backend = self.backend
        # One hold of the server's lock across both steps (each re-enters it), the
        # server re-read from its record first: nothing runs between the steps.
        with self._held(context, instance, "resize"):
            flavor = policy.new_flavor(instance.flavor, set_specs, unset, vcpus, memory_mb)
            policy.vtpm_of(instance, flavor=flavor)
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
        :raises InstanceNotFound: the server left this host meanwhile (deleted,
            shelved, a move reverted or confirmed elsewhere).
        :raises VTPMError: ``settled`` and a resize or move is pending.
        """
        with self.backend.driver.server_operation(context, instance, operation):
            if not self.backend.domain_exists(instance.uuid):
                raise exception.InstanceNotFound(
                    f"no server with name or UUID {instance.name!r} on this host any more: "
                    f"it was deleted, shelved or moved while this command waited to {operation} "
                    "it")
            if settled:
                self._check_nothing_pending(instance, operation)
            yield

    def _decide(self, name_or_uuid: str, confirm: bool) -> None:
        """Confirm or revert the resize or cold migration pending on the server.

        What is pending is asked under the server's lock, on the record re-read
        there: checked before, a resize decided and another one started meanwhile
        would be confirmed or reverted with the stale record (the new resize's
        flavor overwritten, a removed or added vTPM's secret left in Barbican).

        :raises VTPMError: nothing awaits confirm or revert.
        """
        verb = "confirm the resize of" if confirm else "revert the resize of"
        context, instance = self._target(name_or_uuid, verb)
        # The lock's name, from the read before it (the decision is made on the re-read).
        if policy.migrated_from(instance):
            operation = f"{'confirm' if confirm else 'revert'} the migration of"
        else:
            operation = verb
        with self._held(context, instance, operation, settled=False):
            if policy.migrated_from(instance):
                self._finish_migration(context, instance, confirm=confirm)
                return
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
        """Keep the new flavor (drops the old vTPM state), or the migrated server's new host."""
        self._decide(name_or_uuid, confirm=True)

    def revert_resize(self, name_or_uuid: str) -> None:
        """Back to the old flavor and its vTPM state, or to the migration's source host."""
        self._decide(name_or_uuid, confirm=False)

    # -- moving between hosts ------------------------------------------------------------

    def migrate(self, name_or_uuid: str, dest: str, *, live: bool,
                bandwidth_mib: int | None = None) -> dict[str, Any]:
        """Move the server to host ``dest``; cold: then confirm or revert (as a resize).

        :raises InvalidConfiguration: ``dest`` is not a configured host.
        :raises VTPMSecretForbidden: the caller cannot hand the passphrase over
            (``user`` mode, not the owner): nothing moved.
        :raises VTPMError: a resize or another move awaits confirm or revert (asked
            under the server's lock), or the move failed; the server is on its host
            as it was.
        """
        verb = "live-migrate" if live else "migrate"
        context, instance = self._target(name_or_uuid, verb)
        if self._hosts is None:
            raise exception.InvalidConfiguration(
                f"cannot {verb} server {instance.name}: only one host is configured "
                "(set [vtpm] hosts)")
        source = self._host
        policy.check_migration_hosts(source, dest, self._hosts.names)
        self._connect(self._hosts.backend(dest))
        drv = self.backend.driver
        # Checked under the lock, on the server re-read from its record: a resize or
        # move that ended while this command waited has changed it.
        with self._held(context, instance, verb):
            with self._progress(f"{'Live-migrating' if live else 'Migrating'} server "
                                f"{instance.name} from {source} to {dest}"):
                if live:
                    target = self._hosts.side(dest)
                    drv.live_migration(context, instance, target, None, None)
                else:
                    drv.migrate_to(context, instance, dest)
        self._use(dest)
        return self.describe(instance)

    def _check_nothing_pending(self, instance: Any, verb: str) -> None:
        """Refuse ``verb`` while a resize or a move of the server awaits confirm or
        revert: the one rule for a resize, a move, a shelve, a rescue, an unrescue and a
        rebuild (as Nova, which allows none of them in VERIFY_RESIZE). On a stale
        source copy (``migrating_to``) they would act on a server that is on another
        host now. :meth:`_held` asks it under the server's lock, on the re-read
        record.

        :raises VTPMError: naming what is pending and the command that decides it.
        """
        decide = f"run 'vtpm-driver server resize confirm|revert {instance.name}' first"
        if self.backend.resize_pending(instance):  # as Nova: not while VERIFY_RESIZE
            raise exception.VTPMError(
                f"cannot {verb} server {instance.name!r}: a resize is awaiting confirm or "
                f"revert; {decide}")
        if policy.migrated_from(instance):
            raise exception.VTPMError(
                f"cannot {verb} server {instance.name!r}: its migration from "
                f"{policy.migrated_from(instance)} awaits confirm or revert; {decide}")
        if policy.migrating_to(instance):
            dest = policy.migrating_to(instance)
            raise exception.VTPMError(
                f"cannot {verb} server {instance.name!r}: its migration to {dest!r} awaits "
                f"confirm or revert (the server is there now; this is its stopped source "
                f"copy); run 'vtpm-driver --host {dest} server resize confirm|revert "
                f"{instance.name}' first")

    def live_migration_abort(self, name_or_uuid: str) -> bool:
        """Cancel the server's running live migration; False when none runs."""
        _context, instance = self._target(name_or_uuid, "abort the live migration of")
        return bool(self.backend.driver.live_migration_abort(instance))

    def _finish_migration(self, context: RequestContext, instance: Any, *,
                          confirm: bool) -> None:
        """Confirm or revert a cold migration (this command acts on its destination).

        Call it holding the server's lock (:meth:`_held`): ``instance`` is the record
        re-read under it, so the source it names is the move still pending.
        """
        dest, source = self._host, policy.migrated_from(instance)
        if self._hosts is None or dest is None or source not in self._hosts.names:
            raise exception.VTPMError(
                f"server {instance.name!r} was migrated from host {source!r}, which is not "
                "configured in [vtpm] hosts")
        src_backend = self._connect(self._hosts.backend(source))
        drv = src_backend.driver
        verb = "Confirming" if confirm else "Reverting"
        with self._progress(f"{verb} the migration of server {instance.name} from "
                            f"{source} to {dest}"):
            if confirm:
                drv.confirm_migration_to(context, instance, dest)
            else:
                drv.revert_migration_to(context, instance, dest)
                self._use(source)
