"""``server ...`` commands: create and drive standalone vTPM servers.

Each command is a thin layer over :class:`~vtpm_driver.driver.VTPMDriver` (the
Nova ``ComputeDriver``-shaped lifecycle) and :mod:`vtpm_driver.servers` (the
server records kept in libvirt's domain ``<metadata>``). Commands that change a
server authenticate with Keystone first, the OpenStack way (``OS_*`` variables
or ``--os-*`` options): the caller's token is what unlocks the server's vTPM
secret in Barbican, and the user who creates a server owns it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO

import libvirt
from cliff._argparse import SmartHelpFormatter
from cliff.command import Command
from cliff.lister import Lister
from cliff.show import ShowOne
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception, servers, spec
from vtpm_driver.cli.common import DictColumn, add_property_options, int_at_least, key_value
from vtpm_driver.context import RequestContext
from vtpm_driver.driver import VTPMDriver
from vtpm_driver.objects import Flavor, Instance
from vtpm_driver.virt import connection, secret
from vtpm_driver.virt.connection import Hypervisor

POSITIVE_INT = int_at_least(1)
NON_NEGATIVE_INT = int_at_least(0)

LOG = logging.getLogger(__name__)

DEFAULT_AUTH_TYPE = "password"
DEFAULT_SHUTDOWN_TIMEOUT = 60
SHUTDOWN_RETRY_INTERVAL = 10

# Nova's power_state values (nova/compute/power_state.py) -> the names Nova's API shows.
POWER_STATES = {
    0: "pending",
    1: "running",
    3: "paused",
    4: "shutdown",
    6: "crashed",
    7: "suspended",
}

# Password-family plugins: credentials checked up front so a missing one is named.
_PASSWORD_PLUGINS = frozenset({"password", "v3password", "v2password"})
_CREDENTIALS = (
    # (what, namespace attributes any one of which suffices, how to set it)
    ("auth URL", ("os_auth_url",), "OS_AUTH_URL or --os-auth-url"),
    ("user", ("os_username", "os_user_id"), "OS_USERNAME or --os-username"),
    ("password", ("os_password",), "OS_PASSWORD or --os-password"),
    ("project", ("os_project_name", "os_project_id"), "OS_PROJECT_NAME or --os-project-name"),
)
_ANY_CREDENTIAL = ("os_auth_url", "os_username", "os_user_id", "os_password", "os_token",
                   "os_application_credential_id", "os_application_credential_secret")


# --------------------------------------------------------------------------- credentials


def _auth_argv() -> list[str]:
    """Command-line words keystoneauth1 scans for ``--os-auth-type``.

    cliff does not hand the argv to ``get_parser``; the process's own argv is
    what an operator typed (``OS_AUTH_TYPE`` works as well).
    """
    return list(sys.argv[1:])


def _requested_auth_type(argv: list[str]) -> str:
    """The auth type keystoneauth1 will pick (same precedence: option, env, default)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--os-auth-type", "--os-auth-plugin", default=os.environ.get(
        "OS_AUTH_TYPE", os.environ.get("OS_AUTH_PLUGIN", DEFAULT_AUTH_TYPE)))
    return str(pre.parse_known_args(argv)[0].os_auth_type)


def add_auth_options(parser: argparse.ArgumentParser) -> None:
    """keystoneauth1's ``--os-*`` options (defaults from ``OS_*``) + session options.

    :raises InvalidConfiguration: the auth type names no keystoneauth1 plugin.
    """
    argv = _auth_argv()
    auth_type = _requested_auth_type(argv)
    if auth_type != DEFAULT_AUTH_TYPE and (
        auth_type not in ks_loading.get_available_plugin_names()
    ):
        raise exception.InvalidConfiguration(
            f"authentication type {auth_type!r} (OS_AUTH_TYPE or --os-auth-type) is not a "
            "keystoneauth1 plugin; use e.g. 'password'"
        )
    ks_loading.register_auth_argparse_arguments(parser, argv, default=DEFAULT_AUTH_TYPE)
    ks_loading.register_session_argparse_arguments(parser)


def credentials_given(parsed_args: argparse.Namespace) -> bool:
    """True if any credential was given (so a partial set is an error, not 'none')."""
    return any(getattr(parsed_args, name, None) for name in _ANY_CREDENTIAL)


def _missing_credentials(parsed_args: argparse.Namespace) -> list[str]:
    auth_type = getattr(parsed_args, "os_auth_type", None)
    if not isinstance(auth_type, str) or auth_type not in _PASSWORD_PLUGINS:
        return []  # other plugins: keystoneauth1 names what is missing
    return [
        f"{what} ({how})"
        for what, names, how in _CREDENTIALS
        if not any(getattr(parsed_args, name, None) for name in names)
    ]


def authenticate(parsed_args: argparse.Namespace) -> RequestContext:
    """Log in with the given credentials and capture who the caller is.

    :raises InvalidConfiguration: a credential is missing or the auth type unknown.
    :raises VTPMSecretForbidden: Keystone refused the credentials.
    :raises KeyManagerUnavailable: Keystone could not be reached.
    """
    missing = _missing_credentials(parsed_args)
    if missing:
        raise exception.InvalidConfiguration(
            f"missing credentials: {'; '.join(missing)}. Source an openrc file or pass the "
            "--os-* options; the server's owner is the user who creates it"
        )
    try:
        auth = ks_loading.load_auth_from_argparse_arguments(parsed_args)
    except ks_exc.MissingRequiredOptions as exc:
        names = ", ".join("--os-" + opt.name for opt in exc.options)
        raise exception.InvalidConfiguration(f"missing credentials: {names}") from None
    except ks_exc.NoMatchingPlugin as exc:
        raise exception.InvalidConfiguration(
            f"authentication type {exc.name!r} is not a keystoneauth1 plugin"
        ) from None
    if auth is None:
        raise exception.InvalidConfiguration(
            "no credentials: set OS_AUTH_URL, OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME "
            "(and the domain variables) or the matching --os-* options"
        )
    session = ks_loading.load_session_from_argparse_arguments(parsed_args, auth=auth)
    return RequestContext.from_session(session)


# --------------------------------------------------------------------------- backend


class ServerBackend:
    """The driver and the record store behind the ``server`` commands.

    One libvirt connection (opened on first use) is shared by both. Unit tests
    replace :data:`backend_factory` with a fake.
    """

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf
        self.hypervisor = Hypervisor(vtpm_conf.libvirt_uri(conf))
        self._driver: VTPMDriver | None = None

    @property
    def uri(self) -> str:
        return self.hypervisor.uri

    def connect(self) -> None:
        """Open the libvirt connection now (the first one can take seconds)."""
        self.hypervisor.conn  # noqa: B018 - opening the connection is the point

    @property
    def driver(self) -> VTPMDriver:
        if self._driver is None:
            self._driver = VTPMDriver(self.conf, hypervisor=self.hypervisor)
        return self._driver

    def find(self, name_or_uuid: str) -> Instance:
        return servers.find(self.hypervisor.conn, name_or_uuid)

    def list(self) -> list[Instance]:
        return list(servers.list_all(self.hypervisor.conn))

    def domain_uuids(self) -> list[str]:
        """UUIDs of every libvirt domain, ours or not (for the audit)."""
        try:
            domains = self.hypervisor.conn.listAllDomains(0)
            return [dom.UUIDString() for dom in domains]
        except libvirt.libvirtError as exc:
            raise connection.to_vtpm_error(exc, "list domains") from exc

    def libvirt_vtpm_secrets(self) -> list[secret.VTPMSecretInfo]:
        """Every libvirt vTPM secret (for the audit)."""
        return secret.list_vtpm_secrets(self.hypervisor.conn)

    def resize_pending(self, instance: Any) -> bool:
        """True while a resize of ``instance`` awaits confirm or revert."""
        return bool(self.driver.resize_ops.has_backup(instance.uuid))

    def new_instance(self, name: str, context: RequestContext, **kwargs: Any) -> Instance:
        return servers.new_instance(name, context, **kwargs)

    def close(self) -> None:
        self.hypervisor.close()


backend_factory: Callable[[cfg.ConfigOpts], Any] = ServerBackend


# --------------------------------------------------------------------------- presentation


def check_project(context: RequestContext, instance: Any, verb: str) -> None:
    """Nova's default policy: members of the server's project, or an admin.

    Operations that need the vTPM passphrase are further limited to the owner
    by Barbican's ACL in ``user`` mode; this check keeps other projects from
    even stopping or rebooting a server they do not own.
    """
    if context.project_id == instance.project_id or "admin" in context.roles:
        return
    raise exception.NotAuthorized(
        f"cannot {verb} server {instance.name}: it belongs to project {instance.project_id} "
        f"and {context.user_name or context.user_id} is not a member of it (or an admin)"
    )


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress(stream: TextIO, message: str, enabled: bool = True) -> Iterator[None]:
    """``message... done (1.2 s)`` on ``stream``, only when it is a terminal."""
    show = enabled and _isatty(stream)
    if show:
        stream.write(f"{message}...")
        stream.flush()
    started = time.monotonic()
    try:
        yield
    except BaseException:
        if show:
            stream.write(" failed\n")
            stream.flush()
        raise
    if show:
        stream.write(f" done ({time.monotonic() - started:.1f} s)\n")
        stream.flush()


def power_state_name(info: object) -> str:
    """Nova's name for ``driver.get_info(instance).state``."""
    state = getattr(info, "state", info)
    if isinstance(state, str):
        return state
    if isinstance(state, int) and not isinstance(state, bool):
        return POWER_STATES.get(state, f"state {state}")
    return "unknown"


def _mapping(value: object) -> dict[str, str]:
    return dict(value) if isinstance(value, Mapping) else {}


def vtpm_of(instance: Any) -> tuple[spec.VTPMConfig | None, str | None]:
    """(config, None), (None, None) without a vTPM, or (None, reason) if invalid."""
    flavor = getattr(instance, "flavor", None)
    image_meta = getattr(instance, "image_meta", None)
    try:
        config = spec.get_vtpm_config(
            _mapping(getattr(flavor, "extra_specs", None)),
            _mapping(getattr(image_meta, "properties", None)),
        )
    except exception.VTPMError as exc:
        return None, str(exc)
    return config, None


def _owner(instance: Any) -> str:
    return str(getattr(instance, "user_name", None) or getattr(instance, "user_id", ""))


SHOW_COLUMNS = (
    "name", "uuid", "power_state", "resize_status",
    "user_id", "user_name", "project_id", "project_name",
    "vtpm", "vtpm_version", "vtpm_model", "secret_security", "vtpm_secret_uuid",
    "flavor_extra_specs", "image_properties", "vcpus", "memory_mb",
    "kernel", "initrd", "cmdline", "disk", "console_log",
)


RESIZE_PENDING = "awaiting confirm or revert"


def server_fields(instance: Any, power_state: str, resize_pending: bool = False
                  ) -> tuple[tuple[str, ...], tuple]:
    """The ``server show`` columns of ``instance``."""
    config, error = vtpm_of(instance)
    flavor = getattr(instance, "flavor", None)
    image_meta = getattr(instance, "image_meta", None)
    sysmeta = _mapping(getattr(instance, "system_metadata", None))
    values = {
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
        "vtpm_secret_uuid": sysmeta.get("vtpm_secret_uuid"),
        "flavor_extra_specs": DictColumn(_mapping(getattr(flavor, "extra_specs", None))),
        "image_properties": DictColumn(_mapping(getattr(image_meta, "properties", None))),
        "vcpus": getattr(flavor, "vcpus", None),
        "memory_mb": getattr(flavor, "memory_mb", None),
        "kernel": getattr(image_meta, "kernel", None),
        "initrd": getattr(image_meta, "initrd", None),
        "cmdline": getattr(image_meta, "cmdline", None),
        "disk": getattr(image_meta, "disk", None),
        "console_log": getattr(instance, "console_log", None),
    }
    columns = SHOW_COLUMNS
    if error is not None:
        values["vtpm_error"] = error
        columns = (*SHOW_COLUMNS, "vtpm_error")
    return columns, tuple(values[column] for column in columns)


# --------------------------------------------------------------------------- base classes


class ParagraphHelpFormatter(SmartHelpFormatter):
    """Keeps a command description's paragraphs and indented (example) lines.

    argparse would run the whole docstring together into one paragraph.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in textwrap.dedent(text).strip().split("\n\n"):
            lines = block.splitlines()
            if any(line.startswith((" ", "-")) for line in lines):
                blocks.append("\n".join(indent + line for line in lines))
            else:
                blocks.append(super()._fill_text(" ".join(lines), width, indent))
        return "\n\n".join(blocks)



class _ServerCommandMixin:
    """What every ``server`` command shares: backend, credentials, progress."""

    app: Any
    needs_credentials = False

    def _add_options(self, parser: argparse.ArgumentParser) -> None:
        """Subclasses add their own options here."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)  # type: ignore[misc]
        parser.formatter_class = ParagraphHelpFormatter
        self._add_options(parser)
        if self.needs_credentials:
            add_auth_options(parser)
        return parser

    def progress(self, message: str) -> contextlib.AbstractContextManager[None]:
        enabled = getattr(getattr(self.app, "options", None), "verbose_level", 1) > 0
        return progress(self.app.stderr, message, enabled)

    @contextlib.contextmanager
    def backend(self) -> Iterator[Any]:
        """The backend, connected (with progress: the first connection is slow)."""
        backend = backend_factory(self.app.conf)
        try:
            with self.progress(f"Connecting to libvirt at {backend.uri}"):
                backend.connect()
            yield backend
        finally:
            backend.close()

    def context(self, parsed_args: argparse.Namespace) -> RequestContext:
        with self.progress("Authenticating with Keystone"):
            return authenticate(parsed_args)

    def show(self, backend: Any, instance: Any) -> tuple[tuple[str, ...], tuple]:
        """``server show`` output for ``instance`` (asks libvirt for its state)."""
        return server_fields(instance, self.power_state(backend, instance),
                             backend.resize_pending(instance))

    def power_state(self, backend: Any, instance: Any) -> str:
        try:
            return power_state_name(backend.driver.get_info(instance))
        except exception.InstanceNotFound:
            return "deleted"
        except exception.VTPMError as exc:
            LOG.warning("Cannot get the power state of server %s: %s",
                        getattr(instance, "name", "?"), exc)
            return "unknown"


class _ServerAction(_ServerCommandMixin, Command):
    """A change to one existing server; prints nothing on success."""

    needs_credentials = True
    verb = "act on"

    def _add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("server", metavar="NAME|UUID", help="Server to " + self.verb)

    def act(self, backend: Any, context: RequestContext, instance: Any,
            parsed_args: argparse.Namespace) -> None:
        raise NotImplementedError

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        context = self.context(parsed_args)
        with self.backend() as backend:
            instance = backend.find(parsed_args.server)
            check_project(context, instance, self.verb)
            self.act(backend, context, instance, parsed_args)
        return 0


# --------------------------------------------------------------------------- commands


class ServerCreate(_ServerCommandMixin, ShowOne):
    """Create a server (libvirt guest) and start it; show the new server.

    The vTPM is asked for the way Nova asks for it: flavor extra specs
    hw:tpm_version, hw:tpm_model, hw:tpm_secret_security and image properties
    hw_tpm_version, hw_tpm_model. The whole request is checked before anything
    is created; an invalid one exits 1 naming the key and value, leaving no
    domain and no Barbican secret behind.

    Boot either a kernel (--kernel, --initrd, --cmdline) or a disk image
    (--disk, .qcow2 or .raw). The serial console is appended to --console-log.

    Needs credentials (OS_* or --os-*): the authenticated user owns the server
    and, in 'user' secret security mode (the default), only that user can
    later start it, hard-reboot it or resume it.
    """

    needs_credentials = True

    def _add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", metavar="NAME", help="Name of the new server")
        add_property_options(parser)
        boot = parser.add_mutually_exclusive_group(required=True)
        boot.add_argument("--kernel", metavar="PATH", help="Kernel to boot directly")
        boot.add_argument("--disk", metavar="PATH",
                          help="Disk image to boot (.qcow2 or .raw; not with --kernel)")
        parser.add_argument("--initrd", metavar="PATH", help="Initial ramdisk (with --kernel)")
        parser.add_argument("--cmdline", metavar="TEXT",
                            help="Kernel command line (with --kernel; default console=ttyS0)")
        parser.add_argument("--vcpus", metavar="N", type=POSITIVE_INT, default=1,
                            help="Virtual CPUs (default 1)")
        parser.add_argument("--memory", metavar="MIB", type=POSITIVE_INT, default=256,
                            help="Memory in MiB (default 256)")
        parser.add_argument("--console-log", metavar="PATH",
                            help="File the serial console is appended to (default: under "
                                 "[vtpm] console_log_dir)")
        add_usage_check(parser, lambda ns: (
            "--initrd and --cmdline go with --kernel, not with --disk"
            if ns.kernel is None and (ns.initrd is not None or ns.cmdline is not None)
            else None))

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, tuple]:
        flavor_extra_specs = dict(parsed_args.flavor_properties)
        image_properties = dict(parsed_args.image_properties)
        # SPEC A6: every problem in the request before anything is created.
        spec.get_vtpm_config(flavor_extra_specs, image_properties)
        context = self.context(parsed_args)
        with self.backend() as backend:
            try:
                existing = backend.find(parsed_args.name)
            except exception.InstanceNotFound:
                existing = None
            if existing is not None:
                raise exception.InstanceExists(
                    f"a server named {parsed_args.name!r} already exists on this host "
                    f"(uuid {existing.uuid})"
                )
            instance = backend.new_instance(
                parsed_args.name, context,
                flavor_extra_specs=flavor_extra_specs,
                image_properties=image_properties,
                kernel=_abspath(parsed_args.kernel),
                initrd=_abspath(parsed_args.initrd),
                cmdline=parsed_args.cmdline,
                disk=_abspath(parsed_args.disk),
                vcpus=parsed_args.vcpus,
                memory_mb=parsed_args.memory,
                console_log=_abspath(parsed_args.console_log),
            )
            with self.progress(f"Creating and starting server {parsed_args.name}"):
                backend.driver.spawn(context, instance, instance.image_meta, [], None, {})
            return self.show(backend, instance)


class ServerList(_ServerCommandMixin, Lister):
    """List the servers of this host with their owner, vTPM and power state.

    Reads the records kept in libvirt (no credentials needed). Servers whose
    vTPM request is invalid show 'invalid' as their vTPM version.
    """

    COLUMNS = ("Name", "UUID", "Owner", "Project", "vTPM Version", "vTPM Model",
               "Secret Security", "Power State")

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, list]:
        rows = []
        with self.backend() as backend:
            for instance in backend.list():
                config, error = vtpm_of(instance)
                rows.append((
                    instance.name, instance.uuid, _owner(instance),
                    getattr(instance, "project_name", None) or instance.project_id,
                    config.version if config else ("invalid" if error else None),
                    config.model if config else None,
                    config.secret_security if config else None,
                    self.power_state(backend, instance),
                ))
        return self.COLUMNS, rows


class ServerShow(_ServerCommandMixin, ShowOne):
    """Show a server: owner, vTPM configuration, secret UUID, power state.

    The vTPM secret's passphrase is never shown (only its Barbican UUID,
    vtpm_secret_uuid). No credentials needed.
    """

    def _add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("server", metavar="NAME|UUID", help="Server to show")

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[tuple, tuple]:
        with self.backend() as backend:
            return self.show(backend, backend.find(parsed_args.server))


class ServerReboot(_ServerAction):
    """Reboot a server (soft by default: the guest reboots itself).

    --hard powers the guest off and starts it again, which unlocks the vTPM
    state again: in 'user' mode that needs the owner's credentials, and a
    refusal leaves the server as it was.
    """

    verb = "reboot"

    def _add_options(self, parser: argparse.ArgumentParser) -> None:
        super()._add_options(parser)
        parser.add_argument("--hard", action="store_true",
                            help="Power off and start again instead of a guest reboot")

    def act(self, backend: Any, context: RequestContext, instance: Any,
            parsed_args: argparse.Namespace) -> None:
        kind = "HARD" if parsed_args.hard else "SOFT"
        with self.progress(f"Rebooting server {instance.name} ({kind.lower()})"):
            backend.driver.reboot(context, instance, None, kind)


class ServerStop(_ServerAction):
    """Stop a server: press its power button, pull the plug after a timeout.

    The vTPM state is kept. --force pulls the plug at once.
    """

    verb = "stop"

    def _add_options(self, parser: argparse.ArgumentParser) -> None:
        super()._add_options(parser)
        parser.add_argument("--force", action="store_true",
                            help="Power off at once, without asking the guest to shut down")
        parser.add_argument("--shutdown-timeout", metavar="SECONDS", type=NON_NEGATIVE_INT,
                            default=DEFAULT_SHUTDOWN_TIMEOUT,
                            help="Seconds to wait for a clean shutdown before powering off "
                                 f"(default {DEFAULT_SHUTDOWN_TIMEOUT})")

    def act(self, backend: Any, context: RequestContext, instance: Any,
            parsed_args: argparse.Namespace) -> None:
        timeout = 0 if parsed_args.force else parsed_args.shutdown_timeout
        retry = SHUTDOWN_RETRY_INTERVAL if timeout else 0
        with self.progress(f"Stopping server {instance.name}"):
            backend.driver.power_off(instance, timeout=timeout, retry_interval=retry)


class ServerStart(_ServerAction):
    """Start a stopped server (unlocks its vTPM: owner's credentials in 'user' mode)."""

    verb = "start"

    def act(self, backend: Any, context: RequestContext, instance: Any,
            parsed_args: argparse.Namespace) -> None:
        with self.progress(f"Starting server {instance.name}"):
            backend.driver.power_on(context, instance, None)


class ServerSuspend(_ServerAction):
    """Suspend a server: save its memory to disk and stop it (vTPM state kept)."""

    verb = "suspend"

    def act(self, backend: Any, context: RequestContext, instance: Any,
            parsed_args: argparse.Namespace) -> None:
        with self.progress(f"Suspending server {instance.name}"):
            backend.driver.suspend(context, instance)


class ServerResume(_ServerAction):
    """Resume a suspended server (unlocks its vTPM: owner's credentials in 'user' mode)."""

    verb = "resume"

    def act(self, backend: Any, context: RequestContext, instance: Any,
            parsed_args: argparse.Namespace) -> None:
        with self.progress(f"Resuming server {instance.name}"):
            backend.driver.resume(context, instance, None)


class ServerDelete(_ServerAction):
    """Delete a server: its domain, swtpm state, libvirt secret and Barbican secret.

    In 'user' mode deleting the Barbican secret needs the owner's credentials.
    Deleting a server that does not exist exits 1.
    """

    verb = "delete"

    def act(self, backend: Any, context: RequestContext, instance: Any,
            parsed_args: argparse.Namespace) -> None:
        with self.progress(f"Deleting server {instance.name}"):
            backend.driver.destroy(context, instance, None, None, True, True)


class ServerResize(_ServerAction):
    """Resize a server to a new flavor; then confirm or revert.

    The new flavor is the current one with --flavor-property KEY=VALUE set,
    --unset-flavor-property KEY removed, and --vcpus / --memory changed. The
    request is checked first (an invalid one changes nothing). The server is
    stopped, moved to the new flavor and started again, and the resize then
    awaits a decision (server show: resize_status):

      vtpm-driver server resize confirm NAME   keep the new flavor; a vTPM the
                                               new flavor dropped is deleted
      vtpm-driver server resize revert NAME    go back to the old flavor and
                                               its vTPM state

    --confirm / --revert on this command do the same as those subcommands and
    take no flavor changes. A TPM whose version and model are unchanged keeps
    its state; changing either starts a fresh TPM; adding one creates a secret.
    """

    verb = "resize"

    def _add_options(self, parser: argparse.ArgumentParser) -> None:
        super()._add_options(parser)
        parser.add_argument(
            "--flavor-property", metavar="KEY=VALUE", dest="flavor_properties",
            action="append", type=key_value, default=[],
            help="Set an extra spec of the new flavor, e.g. hw:tpm_model=tpm-crb (repeatable)")
        parser.add_argument(
            "--unset-flavor-property", metavar="KEY", dest="unset_flavor_properties",
            action="append", default=[],
            help="Remove an extra spec from the new flavor, e.g. hw:tpm_version (repeatable)")
        parser.add_argument("--vcpus", metavar="N", type=POSITIVE_INT,
                            help="Virtual CPUs of the new flavor (default: unchanged)")
        parser.add_argument("--memory", metavar="MIB", type=POSITIVE_INT,
                            help="Memory in MiB of the new flavor (default: unchanged)")
        decision = parser.add_mutually_exclusive_group()
        decision.add_argument("--confirm", action="store_true",
                              help="Confirm the pending resize (no flavor changes)")
        decision.add_argument("--revert", action="store_true",
                              help="Revert the pending resize (no flavor changes)")
        add_usage_check(parser, _resize_usage_problem)

    def act(self, backend: Any, context: RequestContext, instance: Any,
            parsed_args: argparse.Namespace) -> None:
        if parsed_args.confirm:
            confirm_resize(self, backend, context, instance)
            return
        if parsed_args.revert:
            revert_resize(self, backend, context, instance)
            return
        if backend.resize_pending(instance):
            raise exception.VTPMError(
                f"cannot resize server {instance.name!r}: a resize is awaiting confirm or "
                "revert; run 'vtpm-driver server resize confirm|revert "
                f"{instance.name}' first"
            )
        flavor = new_flavor(instance.flavor, dict(parsed_args.flavor_properties),
                            parsed_args.unset_flavor_properties, parsed_args.vcpus,
                            parsed_args.memory)
        spec.get_vtpm_config(flavor.extra_specs, _mapping(instance.image_meta.properties))
        with self.progress(f"Resizing server {instance.name}"):
            # What Nova's compute manager does between the driver's two steps.
            disk_info = backend.driver.migrate_disk_and_power_off(
                context, instance, None, flavor, None)
            instance.old_flavor, instance.new_flavor = instance.flavor, flavor
            instance.flavor = flavor
            backend.driver.finish_migration(
                context, None, instance, disk_info, None, instance.image_meta, True, {},
                None, True)


class ServerResizeConfirm(_ServerAction):
    """Confirm a pending resize: keep the new flavor (drops the old vTPM state)."""

    verb = "confirm the resize of"

    def act(self, backend: Any, context: RequestContext, instance: Any,
            parsed_args: argparse.Namespace) -> None:
        confirm_resize(self, backend, context, instance)


class ServerResizeRevert(_ServerAction):
    """Revert a pending resize: back to the old flavor and its vTPM state."""

    verb = "revert the resize of"

    def act(self, backend: Any, context: RequestContext, instance: Any,
            parsed_args: argparse.Namespace) -> None:
        revert_resize(self, backend, context, instance)


def _resize_usage_problem(ns: argparse.Namespace) -> str | None:
    changes = (ns.flavor_properties or ns.unset_flavor_properties
               or ns.vcpus is not None or ns.memory is not None)
    if (ns.confirm or ns.revert) and changes:
        return "--confirm and --revert act on a pending resize and take no flavor changes"
    if not changes and not (ns.confirm or ns.revert):
        return ("nothing to resize: give --flavor-property, --unset-flavor-property, --vcpus "
                "or --memory (or --confirm / --revert for a pending resize)")
    return None


def _require_pending_resize(backend: Any, instance: Any, what: str) -> None:
    if not backend.resize_pending(instance):
        raise exception.VTPMError(
            f"cannot {what} server {instance.name!r}: it has no resize awaiting confirm or "
            "revert"
        )


def confirm_resize(command: _ServerCommandMixin, backend: Any, context: RequestContext,
                   instance: Any) -> None:
    """``confirm_migration``: keep the new flavor."""
    _require_pending_resize(backend, instance, "confirm the resize of")
    with command.progress(f"Confirming the resize of server {instance.name}"):
        backend.driver.confirm_migration(context, None, instance, None)


def revert_resize(command: _ServerCommandMixin, backend: Any, context: RequestContext,
                  instance: Any) -> None:
    """``finish_revert_migration``: back to the old flavor."""
    _require_pending_resize(backend, instance, "revert the resize of")
    with command.progress(f"Reverting the resize of server {instance.name}"):
        backend.driver.finish_revert_migration(context, instance, None, None, None, True)


def new_flavor(old: Any, set_specs: Mapping[str, str], unset: list[str],
               vcpus: int | None, memory_mb: int | None) -> Flavor:
    """The flavor a resize moves to: ``old`` with the requested changes."""
    extra_specs = _mapping(getattr(old, "extra_specs", None))
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


# --------------------------------------------------------------------------- argparse types


def add_usage_check(parser: argparse.ArgumentParser,
                    check: Callable[[argparse.Namespace], str | None]) -> None:
    """Run ``check`` after parsing; a message it returns is a usage error (exit 2)."""
    parse_known_args = parser.parse_known_args

    def checked(args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list]:
        parsed, rest = parse_known_args(args, namespace)
        problem = check(parsed)
        if problem:
            parser.error(problem)
        return parsed, rest

    parser.parse_known_args = checked  # type: ignore[method-assign]


def _abspath(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


class _RefusedForVTPM(_ServerAction):
    """An operation the driver refuses for vTPM servers (SPEC F6); exits 1 saying why."""

    operation = ""

    def act(self, backend: Any, context: RequestContext, instance: Any,
            parsed_args: argparse.Namespace) -> None:
        drv = backend.driver
        if self.operation == "live-migrate":
            drv.live_migration(context, instance, None, None, None)
        elif self.operation == "rebuild":
            drv.rebuild(context, instance, instance.image_meta, None, None, None, None,
                        None, None)
        elif self.operation == "rescue":
            drv.rescue(context, instance, None, instance.image_meta, None, None)
        else:
            getattr(drv, self.operation)(context, instance)


def _refused(operation: str) -> type[_RefusedForVTPM]:
    doc = (f"{operation.capitalize()} a server: refused for servers with a vTPM "
           "(their TPM state cannot follow the operation safely yet).")
    return type(f"Server{operation.title().replace('-', '')}", (_RefusedForVTPM,),
                {"__doc__": doc, "operation": operation, "verb": operation})


COMMANDS = {
    "server create": ServerCreate,
    "server list": ServerList,
    "server show": ServerShow,
    "server reboot": ServerReboot,
    "server stop": ServerStop,
    "server start": ServerStart,
    "server suspend": ServerSuspend,
    "server resume": ServerResume,
    "server resize": ServerResize,
    "server resize confirm": ServerResizeConfirm,
    "server resize revert": ServerResizeRevert,
    "server delete": ServerDelete,
    **{f"server {op}": _refused(op)
       for op in ("rebuild", "rescue", "shelve", "evacuate", "live-migrate")},
}
