"""The ``vtpm-driver`` application: cliff ``App``, global options, error reporting.

Commands live in modules listed in :data:`COMMAND_MODULES`; each module
exposes ``COMMANDS = {"name words": CommandClass}``. Adding a module is one
line in that tuple.

Global options (as in python-openstackclient): ``--config-file``,
keystoneauth1's ``--os-*`` credentials (defaults from ``OS_*``) and session
options. Commands reach the caller through :attr:`VTPMDriverApp.context`
(logged in on first use) and the servers of the one libvirt host
(``[libvirt] connection_uri``) through :attr:`VTPMDriverApp.service`. No
command moves a server to another host: Nova does (through the shim).

Exit status: 0 success; 1 the operation was refused or failed, reported as one
``vtpm-driver: error: <message>`` line on stderr (``--debug`` adds the
traceback); 2 usage error. Only command output goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import itertools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from cliff.app import App
from cliff.commandmanager import CommandManager
from oslo_config import cfg

from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception
from vtpm_driver.cli import auth
from vtpm_driver.cli.common import progress
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model.hostcheck import HostProbe
from vtpm_driver.standalone.backend import ServerBackend
from vtpm_driver.standalone.service import ServerService
from vtpm_driver.virt.probe import LibvirtHostProbe

PROG = "vtpm-driver"

COMMAND_MODULES: tuple[str, ...] = (
    "vtpm_driver.cli.checks",
    "vtpm_driver.cli.servers", "vtpm_driver.cli.server_actions", "vtpm_driver.cli.resize",
    "vtpm_driver.cli.consents",
    "vtpm_driver.cli.state",
    "vtpm_driver.cli.audit",
    "vtpm_driver.cli.demo",
)

DEFAULT_CONFIG_FILES: tuple[str, ...] = ("/etc/vtpm-driver/vtpm-driver.conf",)

# Groups whose values are checked when the configuration is loaded, so a bad
# value is reported once, up front, instead of surfacing mid-operation.
_VALIDATED_GROUPS = ("libvirt", "key_manager", "vtpm")


def register_commands(manager: CommandManager, module_name: str) -> None:
    """Add every command of ``module_name``'s ``COMMANDS`` mapping to ``manager``."""
    module = importlib.import_module(module_name)
    for name, command in module.COMMANDS.items():
        manager.add_command(name, command)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def load_conf(config_files: Sequence[str]) -> cfg.ConfigOpts:
    """Parse ``config_files`` and check every value of our option groups.

    :raises InvalidConfiguration: a file is missing or unparsable, or a value
        is invalid (oslo.config would otherwise fail later, on first use).
    """
    where = ", ".join(config_files) or "defaults"
    try:
        conf = vtpm_conf.new_conf(config_files=list(config_files))
    except (cfg.Error, ValueError) as exc:
        raise exception.InvalidConfiguration(
            f"invalid configuration ({where}): {_one_line(exc)}"
        ) from None
    for group, opts in vtpm_conf.list_opts():
        if group.name not in _VALIDATED_GROUPS:
            continue
        for opt in opts:
            try:
                getattr(conf[group.name], opt.dest)
            except (cfg.Error, ValueError) as exc:
                # oslo's text starts with a LocationInfo repr; keep the useful tail.
                reason = _one_line(exc).rpartition(" is not valid: ")[2]
                raise exception.InvalidConfiguration(
                    f"invalid configuration ({where}): [{group.name}] {opt.dest}: {reason}"
                ) from None
    return conf


class _ConsoleFormatter(logging.Formatter):
    """``vtpm-driver: error: message``, as argparse and most Unix tools print."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {super().format(record)}"


class VTPMDriverApp(App):
    """cliff application with global options, lazy login and one-line error reporting.

    ``probe_factory``, ``backend_factory`` and ``login`` replace the host
    probe, the libvirt side of the servers and Keystone (tests use fakes).
    """

    NAME = PROG
    LOG = logging.getLogger("vtpm_driver.cli")

    def __init__(
        self,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        probe_factory: Callable[[cfg.ConfigOpts], HostProbe] | None = None,
        backend_factory: Callable[[cfg.ConfigOpts], Any] | None = None,
        login: Callable[[argparse.Namespace], RequestContext] | None = None,
    ) -> None:
        manager = CommandManager(None)
        for module_name in COMMAND_MODULES:
            register_commands(manager, module_name)
        super().__init__(
            description="Emulated TPMs for libvirt guests, with passphrases held in Barbican.",
            version=_version(),
            command_manager=manager,
            stdout=stdout,
            stderr=stderr,
            deferred_help=True,  # `vtpm-driver host check --help` shows the command's help
        )
        self.probe_factory = probe_factory or LibvirtHostProbe.from_conf
        self.backend_factory = backend_factory or ServerBackend
        self._login = login or auth.authenticate
        self.missing_command = False
        self._conf: cfg.ConfigOpts | None = None
        self._context: RequestContext | None = None
        self._service: ServerService | None = None
        self._auth_error: exception.VTPMError | None = None
        self._handlers: list[logging.Handler] = []
        self._root_level: int | None = None

    def build_option_parser(self, description: str | None, version: str | None,
                            argparse_kwargs: dict[str, Any] | None = None) -> Any:
        parser = super().build_option_parser(
            description, version, {"prog": PROG, **(argparse_kwargs or {})}
        )
        parser.add_argument(
            "--config-file", metavar="PATH", dest="config_files", action="append",
            default=None,
            help="oslo.config file to load (repeatable; later files win). Default: "
                 f"{', '.join(DEFAULT_CONFIG_FILES)} when it exists.",
        )
        return parser

    def run(self, argv: list[str]) -> int:
        """As cliff's; first adds the ``--os-*`` options of the plugin ``argv`` asks for."""
        self._auth_error = auth.add_auth_options(self.parser, argv)
        return super().run(argv)

    @property
    def context(self) -> RequestContext:
        """The caller, logged in with the ``--os-*`` options on first use.

        :raises InvalidConfiguration: credentials missing or auth type unknown.
        :raises VTPMSecretForbidden: Keystone refused them.
        :raises KeyManagerUnavailable: Keystone could not be reached.
        """
        if self._context is None:
            if self._auth_error is not None:
                raise self._auth_error
            with self.progress("Authenticating with Keystone"):
                self._context = self._login(self.options)
        return self._context

    def credentials_given(self) -> bool:
        """Whether any ``--os-*`` credential (or ``OS_*`` variable) was given."""
        return auth.credentials_given(self.options)

    @property
    def service(self) -> ServerService:
        """The servers of this host, acted on as :attr:`context` (closed after the command)."""
        if self._service is None:
            self._service = ServerService(self.conf, self.backend_factory(self.conf),
                                          context=lambda: self.context,
                                          progress=self.progress)
        return self._service

    def progress(self, message: str) -> contextlib.AbstractContextManager[None]:
        """``message... done (1.2 s)`` on stderr when it is a terminal (not with ``-q``)."""
        return progress(self.stderr, message, self.options.verbose_level > 0)

    def clean_up(self, cmd: Any, result: int, err: BaseException | None) -> None:
        """Close the libvirt connection the command opened, if any."""
        if self._service is not None:
            self._service.close()
            self._service = None

    @property
    def conf(self) -> cfg.ConfigOpts:
        """The configuration, loaded on first use so ``help`` works with a broken file."""
        if self._conf is None:
            files = self.options.config_files
            if files is None:
                files = [path for path in DEFAULT_CONFIG_FILES if os.path.exists(path)]
            self._conf = load_conf(files)
        return self._conf

    def configure_logging(self) -> None:
        """Warnings and errors to stderr only; ``-v`` for info, ``-vv`` for debug.

        Replaces cliff's version, which logs INFO to the console and adds
        handlers to the root logger on every run.
        """
        self.remove_logging()
        level = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO}.get(
            self.options.verbose_level, logging.DEBUG
        )
        root = logging.getLogger()
        console = logging.StreamHandler(self.stderr)
        console.setLevel(level)
        console.setFormatter(_ConsoleFormatter("%(message)s"))
        self._handlers.append(console)
        if self.options.log_file:
            file_handler = logging.FileHandler(self.options.log_file)
            file_handler.setFormatter(logging.Formatter(self.LOG_FILE_MESSAGE_FORMAT))
            self._handlers.append(file_handler)
            level = logging.DEBUG
        for handler in self._handlers:
            root.addHandler(handler)
        self._root_level = root.level
        root.setLevel(min(level, root.level or level))

    def remove_logging(self) -> None:
        """Detach the handlers this app added (tests run many apps in one process)."""
        root = logging.getLogger()
        for handler in self._handlers:
            root.removeHandler(handler)
            handler.close()
        self._handlers = []
        if self._root_level is not None:
            root.setLevel(self._root_level)
            self._root_level = None

    def run_subcommand(self, argv: list[str]) -> int:
        """As cliff's, but an unknown command is one usage-error line on stderr."""
        try:
            self.command_manager.find_command(argv)
        except ValueError:
            words = " ".join(itertools.takewhile(lambda arg: not arg.startswith("-"), argv))
            names = sorted(name for name, _ in self.command_manager)
            matches = [name for name in names if words and name.startswith(words)]
            matches = matches or self.get_fuzzy_matches(argv[0])
            hint = f"; did you mean {' or '.join(map(repr, matches))}?" if matches else ""
            self.stderr.write(
                f"{PROG}: error: {words!r} is not a {PROG} command{hint} "
                f"(run '{PROG} help' to list them)\n"
            )
            return 2
        return super().run_subcommand(argv)

    def interact(self) -> None:
        """No interactive shell: a missing command is a usage error."""
        self.missing_command = True
        self.stderr.write(
            f"{PROG}: error: a command is required; run '{PROG} help' to list them\n"
        )


def _version() -> str:
    try:
        return importlib.metadata.version("vtpm-driver")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None, *,
         probe_factory: Callable[[cfg.ConfigOpts], HostProbe] | None = None,
         backend_factory: Callable[[cfg.ConfigOpts], Any] | None = None,
         login: Callable[[argparse.Namespace], RequestContext] | None = None) -> int:
    """Run ``vtpm-driver`` (the console script: ``argv`` is the process's); exit status."""
    app = VTPMDriverApp(probe_factory=probe_factory, backend_factory=backend_factory,
                        login=login)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app.run(args)
    except SystemExit as exc:  # argparse usage errors (2), --help / --version (0)
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        app.remove_logging()
    if app.missing_command:
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
