"""Standalone servers as a service: what the ``server`` commands (and the demo) call.

:class:`ServerBackend` is where servers live: one libvirt connection shared by
the :class:`~vtpm_driver.driver.VTPMDriver` (Nova ``ComputeDriver``-shaped
lifecycle) and the server records of :mod:`vtpm_driver.servers` (kept in each
domain's ``<metadata>``). :class:`ServerService` adds what Nova's API and
compute manager add around the driver: find the server, check the caller's
project, validate a request before anything is created, compute a resize's new
flavor, and describe a server as plain fields. Command-line modules only parse
options, call one method here and format the result.

Every error is a :class:`~vtpm_driver.exception.VTPMError` naming the server
and the reason; nothing here prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import audit as vtpm_audit
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception, policy, servers, spec
from vtpm_driver.context import RequestContext
from vtpm_driver.driver import VTPMDriver
from vtpm_driver.host import LibvirtHostProbe
from vtpm_driver.objects import Flavor, Instance
from vtpm_driver.virt import domains, guest, secret, state
from vtpm_driver.virt.connection import Hypervisor

LOG = logging.getLogger(__name__)

#: Nova's power_state values (nova/compute/power_state.py) -> the names Nova's API shows.
POWER_STATES = {0: "pending", 1: "running", 3: "paused", 4: "shutdown", 6: "crashed",
                7: "suspended"}
RESIZE_PENDING = "awaiting confirm or revert"
SHUTDOWN_RETRY_INTERVAL = 10

#: ``server show`` fields, in order (``vtpm_error`` follows when the request is invalid).
SHOW_FIELDS = (
    "name", "uuid", "power_state", "resize_status",
    "user_id", "user_name", "project_id", "project_name",
    "vtpm", "vtpm_version", "vtpm_model", "secret_security", "vtpm_secret_uuid",
    "flavor_extra_specs", "image_properties", "vcpus", "memory_mb",
    "kernel", "initrd", "cmdline", "disk", "console_log",
)
#: Operations refused for vTPM servers (SPEC F6) -> how the driver is asked.
REFUSED_OPERATIONS = ("rebuild", "rescue", "shelve", "evacuate")

Progress = Callable[[str], contextlib.AbstractContextManager[None]]


def _no_progress(_message: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- pure rules


def power_state_name(info: object) -> str:
    """Nova's name for ``driver.get_info(instance)`` (or its ``state``)."""
    state = getattr(info, "state", info)
    if isinstance(state, str):
        return state
    if isinstance(state, int) and not isinstance(state, bool):
        return POWER_STATES.get(state, f"state {state}")
    return "unknown"


def vtpm_or_error(instance: Any) -> tuple[spec.VTPMConfig | None, str | None]:
    """(config, None), (None, None) without a vTPM, or (None, reason) if invalid."""
    try:
        return policy.vtpm_of(instance), None
    except exception.VTPMError as exc:
        return None, str(exc)


def check_project(context: RequestContext, instance: Any, verb: str) -> None:
    """Nova's default policy: members of the server's project, or an admin.

    Operations that need the vTPM passphrase are further limited to the owner
    by Barbican's ACL in ``user`` mode; this check keeps other projects from
    even stopping or rebooting a server they do not own.

    :raises NotAuthorized: the caller is neither.
    """
    if context.project_id == instance.project_id or "admin" in context.roles:
        return
    raise exception.NotAuthorized(
        f"cannot {verb} server {instance.name}: it belongs to project {instance.project_id} "
        f"and {context.user_name or context.user_id} is not a member of it (or an admin)"
    )


def new_flavor(old: Any, set_specs: Mapping[str, str], unset: Sequence[str],
               vcpus: int | None, memory_mb: int | None) -> Flavor:
    """The flavor a resize moves to: ``old`` with the requested changes.

    :raises InvalidVTPMConfig: ``unset`` names an extra spec the flavor lacks.
    """
    extra_specs = dict(policy.flavor_extra_specs(old))
    unknown = [key for key in unset if key not in extra_specs and key not in set_specs]
    if unknown:
        raise exception.InvalidVTPMConfig(
            f"--unset-flavor-property {', '.join(map(repr, unknown))}: the server's flavor "
            f"has no such extra spec (it has: {', '.join(sorted(extra_specs)) or 'none'})"
        )
    for key in unset:
        extra_specs.pop(key, None)
    extra_specs.update(set_specs)
    return Flavor(
        name=str(getattr(old, "name", "standalone")),
        vcpus=vcpus if vcpus is not None else int(getattr(old, "vcpus", 1)),
        memory_mb=memory_mb if memory_mb is not None else int(getattr(old, "memory_mb", 256)),
        extra_specs=extra_specs,
    )


def server_fields(instance: Any, power_state: str, resize_pending: bool = False
                  ) -> dict[str, Any]:
    """What ``server show`` says about ``instance``, as plain values (no secret)."""
    config, error = vtpm_or_error(instance)
    flavor = getattr(instance, "flavor", None)
    image_meta = getattr(instance, "image_meta", None)
    fields = {
        "name": getattr(instance, "name", None),
        "uuid": getattr(instance, "uuid", None),
        "power_state": power_state,
        "resize_status": RESIZE_PENDING if resize_pending else None,
        "user_id": getattr(instance, "user_id", None),
        "user_name": getattr(instance, "user_name", None),
        "project_id": getattr(instance, "project_id", None),
        "project_name": getattr(instance, "project_name", None),
        "vtpm": config is not None,
        "vtpm_version": config.version if config else None,
        "vtpm_model": config.model if config else None,
        "secret_security": config.secret_security if config else None,
        "vtpm_secret_uuid": policy.recorded_secret(instance),
        "flavor_extra_specs": dict(policy.flavor_extra_specs(flavor)),
        "image_properties": dict(policy.image_properties(image_meta)),
        "vcpus": getattr(flavor, "vcpus", None),
        "memory_mb": getattr(flavor, "memory_mb", None),
        "kernel": getattr(image_meta, "kernel", None),
        "initrd": getattr(image_meta, "initrd", None),
        "cmdline": getattr(image_meta, "cmdline", None),
        "disk": getattr(image_meta, "disk", None),
        "console_log": getattr(instance, "console_log", None),
    }
    if error is not None:
        fields["vtpm_error"] = error
    return fields


def summary_fields(instance: Any, power_state: str, host: str | None = None
                   ) -> dict[str, Any]:
    """What ``server list`` says about ``instance`` ('invalid' for a bad vTPM request)."""
    config, error = vtpm_or_error(instance)
    return {
        "name": instance.name,
        "uuid": instance.uuid,
        "owner": str(getattr(instance, "user_name", None) or instance.user_id),
        "project": getattr(instance, "project_name", None) or instance.project_id,
        "vtpm_version": config.version if config else ("invalid" if error else None),
        "vtpm_model": config.model if config else None,
        "secret_security": config.secret_security if config else None,
        "power_state": power_state,
        "host": host,
    }


def _abspath(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def _configured_hosts(conf: cfg.ConfigOpts) -> list[tuple[str, str]]:
    """``[vtpm] hosts`` (``name=uri`` items) when that option exists, else []."""
    try:
        value = conf.vtpm.hosts
    except (cfg.NoSuchOptError, AttributeError):
        return []
    items = value.items() if isinstance(value, Mapping) else (
        str(item).partition("=")[::2] for item in value or ())
    return [(str(name), str(uri)) for name, uri in items if uri]


# --------------------------------------------------------------------------- where servers live


class ServerBackend:
    """The driver and the record store, over one libvirt connection (opened on first use)."""

    def __init__(self, conf: cfg.ConfigOpts, uri: str | None = None,
                 name: str = vtpm_conf.DEFAULT_HOST,
                 peers: Callable[[str], Any] | None = None) -> None:
        self.conf = conf
        self.name = name
        self.hypervisor = Hypervisor(uri or vtpm_conf.libvirt_uri(conf))
        self._peers = peers
        self._driver: VTPMDriver | None = None

    @property
    def uri(self) -> str:
        return self.hypervisor.uri

    def connect(self) -> None:
        """Open the libvirt connection now (the first one can take seconds).

        :raises HypervisorUnavailable: libvirt cannot be reached.
        """
        self.hypervisor.conn  # noqa: B018 - opening the connection is the point

    @property
    def driver(self) -> VTPMDriver:
        if self._driver is None:
            self._driver = VTPMDriver(self.conf, probe=LibvirtHostProbe(self.uri),
                                      hypervisor=self.hypervisor)
            self._driver.host_name = self.name
            self._driver.peers = self._peers
        return self._driver

    def find(self, name_or_uuid: str) -> Instance:
        """:raises InstanceNotFound: no server has this name or UUID."""
        return servers.find(self.hypervisor.conn, name_or_uuid)

    def list(self) -> list[Instance]:
        return list(servers.list_all(self.hypervisor.conn))

    def new_instance(self, name: str, context: RequestContext, **kwargs: Any) -> Instance:
        return servers.new_instance(name, context, **kwargs)

    def resize_pending(self, instance: Any) -> bool:
        """True while a resize of ``instance`` awaits confirm or revert.

        Adapter: the driver has no public "resize pending?" question yet, so
        this asks its resize operations whether they keep a backup.
        """
        return bool(self.driver.resize_ops.has_backup(instance.uuid))

    def domain_uuids(self) -> list[str]:
        """UUIDs of every libvirt domain, ours or not (for the audit)."""
        return domains.domain_uuids(self.hypervisor.conn)

    def domain_exists(self, domain_uuid: str) -> bool:
        """Whether this host has a domain of that UUID now (a repair checks again)."""
        try:
            guest.lookup(self.hypervisor.conn, domain_uuid)
        except exception.InstanceNotFound:
            return False
        return True

    def other_host_domains(self) -> tuple[list[str], list[str]]:
        """Domain UUIDs of the other configured hosts (``[vtpm] hosts``) and the hosts
        that could not be listed; a server moved there keeps its Barbican secret."""
        found: list[str] = []
        unchecked: list[str] = []
        for name, uri in _configured_hosts(self.conf):
            if uri == self.uri:
                continue
            other = Hypervisor(uri)
            try:
                found.extend(domains.domain_uuids(other.conn))
            except exception.VTPMError as exc:
                LOG.warning("Cannot list the servers of host %s: %s", name, exc)
                unchecked.append(name)
            finally:
                other.close()
        return found, unchecked

    def undefine_libvirt_secret(self, secret_uuid: str) -> bool:
        return secret.undefine_vtpm_secret(self.hypervisor.conn, secret_uuid)

    def remove_state_dir(self, domain_uuid: str) -> bool:
        return state.remove_state(self.conf.vtpm.swtpm_state_dir, domain_uuid)

    def libvirt_vtpm_secrets(self) -> list[secret.VTPMSecretInfo]:
        """Every libvirt vTPM secret (for the audit)."""
        return secret.list_vtpm_secrets(self.hypervisor.conn)

    def close(self) -> None:
        self.hypervisor.close()


class HostSet:
    """The hosts of ``[vtpm] hosts`` (or the one host), one backend each, made on first use.

    ``factory(conf)`` makes the backend of the single default host;
    ``factory(conf, uri=..., name=..., peers=...)`` one of several named hosts,
    whose driver reaches the others through ``peers(name)`` (for migrations).
    """

    def __init__(self, conf: cfg.ConfigOpts, factory: Callable[..., Any] = ServerBackend
                 ) -> None:
        self.conf = conf
        self.uris = vtpm_conf.host_uris(conf)
        self._factory = factory
        self._backends: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        return list(self.uris)

    @property
    def default(self) -> str:
        return self.names[0]

    @property
    def several(self) -> bool:
        return len(self.uris) > 1

    def check(self, name: str) -> str:
        """:raises InvalidConfiguration: ``name`` is not a configured host."""
        if name not in self.uris:
            raise exception.InvalidConfiguration(
                f"unknown host {name!r}: [vtpm] hosts names {', '.join(self.names)}")
        return name

    def backend(self, name: str) -> Any:
        """The backend of host ``name`` (not connected yet)."""
        self.check(name)
        if name not in self._backends:
            if self.several or name != vtpm_conf.DEFAULT_HOST:
                self._backends[name] = self._factory(self.conf, uri=self.uris[name],
                                                     name=name, peers=self.side)
            else:
                self._backends[name] = self._factory(self.conf)
        return self._backends[name]

    def side(self, name: str) -> Any:
        """Host ``name`` as one side of a move (what a driver's ``peers`` returns)."""
        return self.backend(name).driver.migration_side(name)

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()


# --------------------------------------------------------------------------- the service


class ServerService:
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
            return power_state_name(self.backend.driver.get_info(instance))
        except exception.InstanceNotFound:
            return "deleted"
        except exception.VTPMError as exc:
            LOG.warning("Cannot get the power state of server %s: %s",
                        getattr(instance, "name", "?"), exc)
            return "unknown"

    def describe(self, instance: Any) -> dict[str, Any]:
        """:func:`server_fields` with the live power state and resize status."""
        fields = server_fields(instance, self.power_state(instance),
                               self.backend.resize_pending(instance)
                               or bool(policy.migrated_from(instance)))
        if self._hosts is not None and self._hosts.several:
            fields["host"] = self._host
        return fields

    def show(self, name_or_uuid: str) -> dict[str, Any]:
        """:raises InstanceNotFound: no such server."""
        return self.describe(self.locate(name_or_uuid))

    def list(self) -> list[dict[str, Any]]:
        """Every server, sorted by name, with its host (no credentials needed).

        Every configured host unless one was chosen; an unreachable host is
        skipped with a warning. The stopped source copy of a cold migration
        awaiting confirm or revert is not listed (the server is on the destination).
        """
        if self._hosts is None or self._explicit_host or not self._hosts.several:
            return [summary_fields(instance, self.power_state(instance), self._host)
                    for instance in self.backend.list()]
        rows = []
        for name in self._hosts.names:
            try:
                instances = self._use(name).list()
            except exception.HypervisorUnavailable as exc:
                LOG.warning("Host %s is unreachable, its servers are not listed: %s",
                            name, exc)
                continue
            rows += [summary_fields(instance, self.power_state(instance), name)
                     for instance in instances if not policy.migrating_to(instance)]
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
        check_project(context, instance, verb)
        return context, instance

    def reboot(self, name_or_uuid: str, hard: bool = False) -> None:
        """Soft (guest) or hard (power cycle; unlocks the vTPM again) reboot."""
        context, instance = self._target(name_or_uuid, "reboot")
        kind = "HARD" if hard else "SOFT"
        with self._progress(f"Rebooting server {instance.name} ({kind.lower()})"):
            self.backend.driver.reboot(context, instance, None, kind)

    def stop(self, name_or_uuid: str, timeout: int) -> None:
        """Ask the guest to shut down, power off after ``timeout`` s (0: at once)."""
        _context, instance = self._target(name_or_uuid, "stop")
        retry = SHUTDOWN_RETRY_INTERVAL if timeout else 0
        with self._progress(f"Stopping server {instance.name}"):
            self.backend.driver.power_off(instance, timeout=timeout, retry_interval=retry)

    def start(self, name_or_uuid: str) -> None:
        context, instance = self._target(name_or_uuid, "start")
        with self._progress(f"Starting server {instance.name}"):
            self.backend.driver.power_on(context, instance, None)

    def suspend(self, name_or_uuid: str) -> None:
        context, instance = self._target(name_or_uuid, "suspend")
        with self._progress(f"Suspending server {instance.name}"):
            self.backend.driver.suspend(context, instance)

    def resume(self, name_or_uuid: str) -> None:
        context, instance = self._target(name_or_uuid, "resume")
        with self._progress(f"Resuming server {instance.name}"):
            self.backend.driver.resume(context, instance, None)

    def delete(self, name_or_uuid: str) -> None:
        """Domain, swtpm state, libvirt secret and Barbican secret.

        :raises InstanceNotFound: the server does not exist (a second delete).
        """
        context, instance = self._target(name_or_uuid, "delete")
        with self._progress(f"Deleting server {instance.name}"):
            self.backend.driver.destroy(context, instance, None, None, True, True)

    def refuse(self, name_or_uuid: str, operation: str) -> None:
        """Ask the driver for an operation it refuses for vTPM servers (SPEC F6).

        :raises OperationNotSupportedForVTPM: the server has a vTPM.
        """
        context, instance = self._target(name_or_uuid, operation)
        drv = self.backend.driver
        if operation == "rebuild":
            drv.rebuild(context, instance, instance.image_meta, None, None, None, None,
                        None, None)
        elif operation == "rescue":
            drv.rescue(context, instance, None, instance.image_meta, None, None)
        elif operation in ("shelve", "evacuate"):
            getattr(drv, operation)(context, instance)
        else:
            raise exception.VTPMError(f"unknown operation {operation!r}")

    # -- resize ------------------------------------------------------------------------

    def resize(self, name_or_uuid: str, *, set_specs: Mapping[str, str],
               unset: Sequence[str] = (), vcpus: int | None = None,
               memory_mb: int | None = None) -> None:
        """Move the server to its flavor with these changes; then confirm or revert.

        :raises VTPMError: a resize is already pending.
        :raises InvalidVTPMConfig: the new flavor (with the image) is invalid;
            nothing is changed.
        """
        context, instance = self._target(name_or_uuid, "resize")
        backend = self.backend
        if backend.resize_pending(instance):
            raise exception.VTPMError(
                f"cannot resize server {instance.name!r}: a resize is awaiting confirm or "
                "revert; run 'vtpm-driver server resize confirm|revert "
                f"{instance.name}' first")
        flavor = new_flavor(instance.flavor, set_specs, unset, vcpus, memory_mb)
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

    def _pending(self, name_or_uuid: str, verb: str) -> tuple[RequestContext, Any]:
        context, instance = self._target(name_or_uuid, verb)
        if not self.backend.resize_pending(instance) and not policy.migrated_from(instance):
            raise exception.VTPMError(
                f"cannot {verb} server {instance.name!r}: it has no resize awaiting confirm "
                "or revert")
        return context, instance

    def confirm_resize(self, name_or_uuid: str) -> None:
        """Keep the new flavor (drops the old vTPM state)."""
        context, instance = self._pending(name_or_uuid, "confirm the resize of")
        if policy.migrated_from(instance):
            self._finish_migration(context, instance, confirm=True)
            return
        with self._progress(f"Confirming the resize of server {instance.name}"):
            self.backend.driver.confirm_migration(context, None, instance, None)

    def revert_resize(self, name_or_uuid: str) -> None:
        """Back to the old flavor and its vTPM state."""
        context, instance = self._pending(name_or_uuid, "revert the resize of")
        if policy.migrated_from(instance):
            self._finish_migration(context, instance, confirm=False)
            return
        with self._progress(f"Reverting the resize of server {instance.name}"):
            self.backend.driver.finish_revert_migration(context, instance, None, None, None,
                                                        True)

    # -- moving between hosts ------------------------------------------------------------

    def migrate(self, name_or_uuid: str, dest: str, *, live: bool,
                bandwidth_mib: int | None = None) -> dict[str, Any]:
        """Move the server to host ``dest``; cold: then confirm or revert (as a resize).

        :raises InvalidConfiguration: ``dest`` is not a configured host.
        :raises VTPMSecretForbidden: the caller cannot hand the passphrase over
            (``user`` mode, not the owner): nothing moved.
        :raises VTPMError: the move failed; the server is on its host as it was.
        """
        verb = "live-migrate" if live else "migrate"
        context, instance = self._target(name_or_uuid, verb)
        if self._hosts is None:
            raise exception.InvalidConfiguration(
                f"cannot {verb} server {instance.name}: only one host is configured "
                "(set [vtpm] hosts)")
        source = self._host
        if not live and self.backend.resize_pending(instance):
            raise exception.VTPMError(
                f"cannot migrate server {instance.name!r}: a resize is awaiting confirm or "
                "revert")
        if policy.migrated_from(instance):
            raise exception.VTPMError(
                f"cannot {verb} server {instance.name!r}: its migration from "
                f"{policy.migrated_from(instance)} awaits confirm or revert")
        policy.check_migration_hosts(source, dest, self._hosts.names)
        self._connect(self._hosts.backend(dest))
        drv = self.backend.driver
        with self._progress(f"{'Live-migrating' if live else 'Migrating'} server "
                            f"{instance.name} from {source} to {dest}"):
            if live:
                target = self._hosts.side(dest)
                drv.live_migration(context, instance, target, None, None)
            else:
                drv.migrate_to(context, instance, dest)
        self._use(dest)
        return self.describe(instance)

    def live_migration_abort(self, name_or_uuid: str) -> bool:
        """Cancel the server's running live migration; False when none runs."""
        _context, instance = self._target(name_or_uuid, "abort the live migration of")
        return bool(self.backend.driver.live_migration_abort(instance))

    def _finish_migration(self, context: RequestContext, instance: Any, *,
                          confirm: bool) -> None:
        """Confirm or revert a cold migration (this command acts on its destination)."""
        dest, source = self._host, policy.migrated_from(instance)
        if self._hosts is None or dest is None or source not in self._hosts.names:
            raise exception.VTPMError(
                f"server {instance.name!r} was migrated from host {source!r}, which is not "
                "configured in [vtpm] hosts")
        src_backend = self._connect(self._hosts.backend(source))
        drv = src_backend.driver
        verb = "Confirming" if confirm else "Reverting"
        with self._progress(f"{verb} the migration of server {instance.name} from {source} "
                            f"to {dest}"):
            if confirm:
                drv.confirm_migration_to(context, instance, dest)
            else:
                drv.revert_migration_to(context, instance, dest)
                self._use(source)

    # -- audit ------------------------------------------------------------------------

    def list_barbican(self, keymgr: Any, scopes: Sequence[tuple[RequestContext, str]]
                      ) -> list[vtpm_audit.BarbicanSecret]:
        """The vTPM secrets each ``(context, mode)`` can list, with their read ACL.

        One listing per scope and one ACL GET per secret (metadata only).
        :raises VTPMError: Barbican or Keystone failed.
        """
        found: dict[str, vtpm_audit.BarbicanSecret] = {}
        for context, mode in scopes:
            for item in keymgr.list_vtpm_secrets(context, mode):
                uuid = item.get("uuid")
                access = keymgr.secret_project_access(context, uuid, mode) if uuid else None
                found.setdefault(str(uuid), vtpm_audit.BarbicanSecret(
                    uuid=uuid, name=str(item.get("name")),
                    instance_uuid=item.get("instance_uuid"), mode=mode,
                    project_access=access, created=item.get("created"),
                    creator=item.get("creator")))
        return list(found.values())

    def audit(self, barbican: Sequence[vtpm_audit.BarbicanSecret] | None
              ) -> vtpm_audit.AuditReport:
        """This host's vTPM servers and orphans (SPEC F7); changes nothing.

        ``barbican``: the vTPM secrets the caller could list, or None when
        Barbican was not checked (then no Barbican orphan is reported).
        """
        backend = self.backend
        base = str(self.conf.vtpm.swtpm_state_dir)
        return vtpm_audit.audit(
            backend.list(), backend.domain_uuids(),
            [vtpm_audit.LibvirtSecret(s.uuid, s.usage_id, s.ephemeral, s.private)
             for s in backend.libvirt_vtpm_secrets()],
            state.list_state_dirs(base), None if barbican is None else list(barbican),
            state_dir_base=base)

    def repair_plan(self, report: vtpm_audit.AuditReport, *, min_age: float,
                    only: Sequence[str] | None = None) -> vtpm_audit.RepairPlan:
        """:func:`vtpm_driver.audit.plan` with the other hosts' servers left out of it."""
        elsewhere, unchecked = self.backend.other_host_domains()
        if elsewhere:
            kept = {vtpm_audit.canonical_uuid(u) for u in elsewhere}
            report = dataclasses.replace(report, orphans=tuple(
                o for o in report.orphans
                if o.kind != vtpm_audit.BARBICAN_SECRET or o.instance_uuid not in kept))
        return vtpm_audit.plan(report, now=time.time(), min_age=min_age,
                               hosts_unchecked=unchecked, only=only)

    def repair(self, plan: vtpm_audit.RepairPlan, keymgr: Any,
               contexts: Mapping[str, RequestContext]) -> list[tuple[vtpm_audit.Action, str]]:
        """Do each action of ``plan``; returns (action, outcome) for each, never raises.

        A state directory or Barbican secret is only removed if no domain of
        its UUID has appeared since the audit. ``contexts`` maps a secret
        security mode to the context its Barbican secrets were listed with.
        """
        done = []
        for action in plan.actions:
            try:
                outcome = self._do(action, keymgr, contexts)
            except exception.VTPMError as exc:
                outcome = f"failed: {exc}"
            done.append((action, outcome))
        return done

    def _do(self, action: vtpm_audit.Action, keymgr: Any,
            contexts: Mapping[str, RequestContext]) -> str:
        backend = self.backend
        if action.kind == vtpm_audit.UNDEFINE_SECRET:
            return "done" if backend.undefine_libvirt_secret(action.target) else "already gone"
        if action.kind in (vtpm_audit.REMOVE_STATE, vtpm_audit.DELETE_BARBICAN) and (
                action.instance_uuid and backend.domain_exists(action.instance_uuid)):
            return "skipped: a domain of that UUID exists now"
        if action.kind == vtpm_audit.REMOVE_STATE:
            gone = backend.remove_state_dir(action.instance_uuid)
            return "done" if gone else "already gone"
        context = contexts[action.mode or spec.SECRET_USER]
        if action.kind == vtpm_audit.DELETE_BARBICAN:
            gone = keymgr.delete_secret(context, action.target, action.mode)
            return "done" if gone else "already gone"
        keymgr.set_owner_only_acl(context, action.target, action.user_id, action.mode)
        return "done"
