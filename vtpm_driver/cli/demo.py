"""``vtpm-driver demo``: the whole story on this host, checked step by step.

The demo creates a TPM 2.0 (CRB) server as a regular user, then shows what the
guest saw, where its key lives (Barbican only, readable by the owner only;
nothing in libvirt; the state on disk encrypted), that another member of the
same project can neither read the key nor restart the server, that a hard
reboot by the owner keeps the TPM's identity, and that deleting the server
leaves nothing behind. Every step is a check with a result line; the demo
server is deleted whatever happens.

It drives the same code as ``server create|reboot|delete`` (the driver and the
server records), in one process, so each step can be timed and checked
against libvirt, the swtpm state directory and Barbican directly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn, TextIO

import requests
import yaml
from cliff.command import Command
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session
from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import exception, keymgr, spec
from vtpm_driver.cli import servers as server_cli
from vtpm_driver.context import RequestContext
from vtpm_driver.host import check_host
from vtpm_driver.virt import guest as virt_guest
from vtpm_driver.virt import secret as virt_secret
from vtpm_driver.virt import state as virt_state

LOG = logging.getLogger(__name__)

DEFAULT_CLOUDS_FILE = "/var/lib/vtpm-driver/stack/clouds.yaml"
DEFAULT_MEMBER_CLOUD = "member"
DEFAULT_GUEST_DIR = "/var/cache/vtpm-driver/guest"
DEFAULT_BOOT_TIMEOUT = 120
GUEST_CMDLINE = "console=ttyS0 vtpm_test=stay"
NAME_PREFIX = "vtpm-demo-"

# What the demo asks for, and what the guest must then report.
FLAVOR_EXTRA_SPECS = {
    spec.FLAVOR_VERSION_KEY: spec.VERSION_2_0,
    spec.FLAVOR_MODEL_KEY: spec.MODEL_CRB,
    spec.FLAVOR_SECRET_SECURITY_KEY: spec.SECRET_USER,
}
EXPECTED_GUEST = {"version": "2", "driver": "tpm_crb", "getrandom_rc": "0"}

_RESULT_RE = re.compile(r"VTPM_RESULT((?: +[a-z_]+=\S*)+) *$")
_HTTP_STATUS_RE = re.compile(r"\(HTTP (\d{3})\)")
_POLL_INTERVAL = 0.2
_TICK = 0.2

OK, FAIL, SKIP = "ok", "FAIL", "skip"


class CheckFailed(Exception):
    """A demo check did not hold; the message says what was seen instead."""


# --------------------------------------------------------------------------- pure helpers


def parse_vtpm_results(text: str) -> list[dict[str, str]]:
    """Every ``VTPM_RESULT`` line of a console log (one per boot), oldest first."""
    results = []
    for line in text.splitlines():
        match = _RESULT_RE.search(line.rstrip("\r"))
        if match:
            results.append(dict(item.split("=", 1) for item in match.group(1).split()))
    return results


def results_since(before: str, now: str) -> list[dict[str, str]]:
    """Result lines printed after ``before`` was read from the same console log.

    libvirt appends to the file, but a driver may also start each boot with a
    new one: if ``now`` does not continue ``before`` the whole file is new.
    Only complete lines of ``before`` count as already seen.
    """
    seen = before[: before.rfind("\n") + 1]
    if seen and now.startswith(seen):
        return parse_vtpm_results(now[len(seen):])
    return parse_vtpm_results(now)


def result_line(result: Mapping[str, str]) -> str:
    """A parsed result as the guest printed it."""
    return "VTPM_RESULT " + " ".join(f"{key}={value}" for key, value in result.items())


def guest_problems(result: Mapping[str, str]) -> list[str]:
    """How a guest's result differs from a working TPM 2.0 on the CRB interface."""
    problems = [
        f"{key}={result.get(key, 'missing')} (expected {key}={want})"
        for key, want in EXPECTED_GUEST.items()
        if result.get(key) != want
    ]
    ek = result.get("ek", "")
    if not re.fullmatch(r"[0-9a-f]{64}", ek):
        problems.append(f"ek={ek or 'missing'} (expected the SHA-256 of the TPM's EK)")
    return problems


def short(digest: str) -> str:
    """First 16 hex digits: enough to compare two identities by eye."""
    return digest[:16] + "..." if len(digest) > 16 else digest


def cloud_credentials(clouds: object, name: str, where: str) -> dict[str, str]:
    """Password credentials of cloud ``name`` from a parsed clouds.yaml.

    :raises InvalidConfiguration: the cloud or one of its credentials is missing.
    """
    entries = clouds.get("clouds") if isinstance(clouds, Mapping) else None
    if not isinstance(entries, Mapping):
        raise exception.InvalidConfiguration(f"{where} has no 'clouds' mapping")
    cloud = entries.get(name)
    if not isinstance(cloud, Mapping) or not isinstance(cloud.get("auth"), Mapping):
        known = ", ".join(sorted(str(key) for key in entries)) or "none"
        raise exception.InvalidConfiguration(
            f"--member-cloud {name!r}: {where} has no such cloud with an 'auth' section "
            f"(clouds there: {known})"
        )
    auth = cloud["auth"]
    creds = {
        "auth_url": auth.get("auth_url"),
        "username": auth.get("username"),
        "password": auth.get("password"),
        "project_name": auth.get("project_name"),
        "user_domain_name": auth.get("user_domain_name") or "Default",
        "project_domain_name": auth.get("project_domain_name") or "Default",
    }
    missing = [key for key, value in creds.items() if not isinstance(value, str) or not value]
    if missing:
        raise exception.InvalidConfiguration(
            f"cloud {name!r} in {where} lacks auth {', '.join(missing)}"
        )
    return creds


def load_clouds_file(path: str) -> object:
    """The parsed clouds.yaml.

    :raises InvalidConfiguration: it cannot be read or is not YAML.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except OSError as exc:
        raise exception.InvalidConfiguration(
            f"--clouds-file {path!r}: cannot read it ({exc.strerror}); run "
            "'tools/keymgr-stack.sh start' or pass --clouds-file"
        ) from None
    except yaml.YAMLError as exc:
        raise exception.InvalidConfiguration(
            f"--clouds-file {path!r} is not valid YAML: {' '.join(str(exc).split())}"
        ) from None


def http_status_of(error: BaseException) -> str:
    """``HTTP 403`` from one of our key manager errors, or '' if it names none."""
    match = _HTTP_STATUS_RE.search(str(error))
    return f"HTTP {match.group(1)}" if match else ""


def format_step(status: str, seconds: float | None, title: str, detail: str) -> str:
    """``ok     1.52 s  create server: ...``: status first so failures stand out."""
    timing = f"{seconds:6.2f} s" if seconds is not None else " " * 8
    return f"{status:<4} {timing}  {title}: {detail}"


# --------------------------------------------------------------------------- output


@dataclasses.dataclass
class StepResult:
    """What one step showed."""

    title: str
    status: str
    seconds: float | None
    detail: str


class Reporter:
    """One line per step on ``stream``; a live timer for slow steps on a terminal."""

    def __init__(self, stream: TextIO, live: bool) -> None:
        self._stream = stream
        self._live = live
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()

    def step(self, result: StepResult) -> None:
        self.write(format_step(result.status, result.seconds, result.title, result.detail))

    @contextlib.contextmanager
    def running(self, title: str) -> Iterator[None]:
        """Show ``..  3.4 s  title`` while the step runs (terminal only)."""
        if not self._live:
            yield
            return
        started = time.monotonic()
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(_TICK):
                with self._lock:
                    self._stream.write(
                        f"\r{'..':<4} {time.monotonic() - started:6.1f} s  {title} ...")
                    self._stream.flush()

        ticker = threading.Thread(target=tick, name="demo-progress", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()
            with self._lock:
                self._stream.write("\r\033[K")
                self._stream.flush()


# --------------------------------------------------------------------------- the demo


@dataclasses.dataclass(frozen=True)
class Step:
    title: str
    run: Callable[[], str]
    required: bool = False  # when it fails, the later steps cannot mean anything


class DemoRun:
    """The demo's steps and their shared state (server, contexts, first boot)."""

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        backend: Any,
        reporter: Reporter,
        *,
        owner_login: Callable[[], RequestContext],
        member_login: Callable[[], RequestContext],
        probe_factory: Callable[[cfg.ConfigOpts], Any],
        guest_dir: Path,
        boot_timeout: float,
        name: str | None = None,
    ) -> None:
        self.conf = conf
        self.backend = backend
        self.reporter = reporter
        self._owner_login = owner_login
        self._member_login = member_login
        self._probe_factory = probe_factory
        self.guest_dir = guest_dir
        self.boot_timeout = boot_timeout
        self.name = name or NAME_PREFIX + uuid_mod.uuid4().hex[:8]
        self.keymgr = keymgr.KeyManager(conf)
        self._http = ks_session.Session(timeout=float(conf.key_manager.timeout),
                                        app_name="vtpm-driver-demo")
        self.owner: RequestContext | None = None
        self.member: RequestContext | None = None
        self.instance: Any = None
        self.secret_uuid: str | None = None
        self.first_boot: dict[str, str] | None = None
        self.deleted = False

    # -- running ----------------------------------------------------------

    def steps(self) -> list[Step]:
        return [
            Step("host check", self.host_check, required=True),
            Step("log in", self.log_in, required=True),
            Step("create server", self.create_server, required=True),
            Step("guest saw", self.guest_saw),
            Step("key in Barbican", self.key_in_barbican),
            Step("key not in libvirt", self.key_not_in_libvirt),
            Step("state on disk", self.state_on_disk),
            Step("member reads the key", self.member_reads_key),
            Step("member hard-reboots", self.member_hard_reboots),
            Step("owner hard-reboots", self.owner_hard_reboots),
            Step("delete", self.delete),
        ]

    def run(self) -> list[StepResult]:
        """Run every step (skipping the rest after a required one fails), then clean up."""
        results: list[StepResult] = []
        blocked: str | None = None
        try:
            for step in self.steps():
                if blocked is not None:
                    result = StepResult(step.title, SKIP, None, f"not run ({blocked} failed)")
                else:
                    try:
                        result = self._run_step(step)
                    except (KeyboardInterrupt, SystemExit) as exc:
                        why = "SIGTERM" if isinstance(exc, SystemExit) else "Ctrl-C"
                        self.reporter.step(StepResult(step.title, FAIL, None,
                                                      f"interrupted ({why})"))
                        raise
                    if result.status == FAIL and step.required:
                        blocked = step.title
                self.reporter.step(result)
                results.append(result)
        finally:
            cleanup = self.cleanup()
            if cleanup is not None:
                self.reporter.step(cleanup)
                results.append(cleanup)
        return results

    def _run_step(self, step: Step) -> StepResult:
        started = time.monotonic()
        status = OK
        try:
            with self.reporter.running(step.title):
                detail = step.run()
        except (CheckFailed, exception.VTPMError) as exc:
            status, detail = FAIL, _one_line(exc)
        return StepResult(step.title, status, time.monotonic() - started, detail)

    # -- steps ------------------------------------------------------------

    def host_check(self) -> str:
        """SPEC C2/C3: the host offers every trait the demo's request needs."""
        needed = spec.required_traits(FLAVOR_EXTRA_SPECS, {})
        probe = self._probe_factory(self.conf)
        try:
            report = check_host(self.conf, probe)
        finally:
            close = getattr(probe, "close", None)
            if close is not None:
                close()
        if not report.supported:
            raise CheckFailed("this host cannot run vTPM guests: " + "; ".join(report.problems))
        missing = sorted(trait for trait in needed if not report.traits.get(trait))
        if missing:
            raise CheckFailed(f"host lacks {', '.join(missing)}")
        versions = ", ".join(f"{key} {value}" for key, value in report.versions.items())
        return f"{', '.join(sorted(needed))} supported ({versions})"

    def log_in(self) -> str:
        self.owner = self._owner_login()
        self.member = self._member_login()
        owner, member = self.owner, self.member
        if member.user_id == owner.user_id:
            raise CheckFailed(
                f"the member credentials are the owner's own ({_who(owner)}): pass another "
                "user of the same project with --member-cloud")
        if member.project_id != owner.project_id:
            raise CheckFailed(
                f"member {_who(member)} is in project {_project(member)}, the owner in "
                f"{_project(owner)}: the demo needs two users of the same project")
        return (f"owner {_who(owner)} and member {_who(member)}, both in project "
                f"{_project(owner)}")

    def create_server(self) -> str:
        kernel, initrd = self.guest_dir / "vmlinuz", self.guest_dir / "initrd.img"
        for path in (kernel, initrd):
            if not path.is_file():
                raise CheckFailed(f"test guest file {path} missing: run tools/build-guest.sh "
                                  "(or pass --guest-dir)")
        owner = self._need(self.owner)
        self.instance = self.backend.new_instance(
            self.name, owner,
            flavor_extra_specs=dict(FLAVOR_EXTRA_SPECS),
            image_properties={},
            kernel=str(kernel), initrd=str(initrd), cmdline=GUEST_CMDLINE,
            disk=None, vcpus=1, memory_mb=256, console_log=None,
        )
        self.backend.driver.spawn(owner, self.instance, self.instance.image_meta, [], None, {})
        self.secret_uuid = self.instance.system_metadata.get(keymgr.SYSMETA_KEY)
        if not self.secret_uuid:
            raise CheckFailed(f"server {self.name} started but records no "
                              f"system_metadata['{keymgr.SYSMETA_KEY}']")
        return (f"{self.name} ({self.instance.uuid}) as {_who(owner)}: TPM 2.0, tpm-crb, "
                f"secret security user; guest cmdline '{GUEST_CMDLINE}'")

    def guest_saw(self) -> str:
        self.first_boot = self._wait_for_boot("")
        problems = guest_problems(self.first_boot)
        if problems:
            raise CheckFailed(f"{result_line(self.first_boot)}: {'; '.join(problems)}")
        return result_line(self.first_boot)

    def key_in_barbican(self) -> str:
        """SPEC D1/D3, read as the owner: name, type, and the owner-only read ACL."""
        owner, secret_uuid = self._need(self.owner), self._need(self.secret_uuid)
        meta = self._barbican_json(owner, f"secrets/{secret_uuid}", "read the secret's metadata")
        acl = self._barbican_json(owner, f"secrets/{secret_uuid}/acl", "read the secret's ACL")
        problems = []
        want_name = keymgr.secret_name(self.instance.uuid)
        if meta.get("name") != want_name:
            problems.append(f"name {meta.get('name')!r} (expected {want_name!r})")
        if meta.get("secret_type") != keymgr.SECRET_TYPE:
            problems.append(f"type {meta.get('secret_type')!r} (expected {keymgr.SECRET_TYPE})")
        read = acl.get("read") if isinstance(acl.get("read"), Mapping) else {}
        project_access = read.get("project-access")
        users = read.get("users") if isinstance(read.get("users"), list) else []
        if project_access is not False:
            problems.append(f"read ACL project-access {project_access!r} (expected false)")
        if users != [owner.user_id]:
            problems.append(f"read ACL users {users} (expected only the owner {owner.user_id})")
        if problems:
            raise CheckFailed(f"Barbican secret {secret_uuid}: " + "; ".join(problems))
        return (f"secret {secret_uuid} '{meta['name']}', type {meta['secret_type']}; "
                f"read ACL: project-access false, users [{_who(owner)}] only")

    def key_not_in_libvirt(self) -> str:
        """SPEC E3: in user mode libvirt forgets the key once swtpm has it."""
        self._check_no_libvirt_secret("after the start")
        return "no vtpm secret defined (handed to swtpm at start, then undefined)"

    def state_on_disk(self) -> str:
        path = virt_state.state_file(self.conf.vtpm.swtpm_state_dir, self.instance.uuid,
                                     spec.VERSION_2_0)
        if not path.exists():
            raise CheckFailed(f"no swtpm state file at {path}")
        header = virt_state.read_blob_header(path)
        if header is None:
            raise CheckFailed(f"{path} has no swtpm blob header: cannot tell that it is "
                              "encrypted")
        if not header.encrypted:
            raise CheckFailed(f"{path} is NOT encrypted (blob flags 0x{header.flags:04x})")
        return f"{path} encrypted (swtpm blob header flags 0x{header.flags:04x})"

    def member_reads_key(self) -> str:
        """SPEC D3: another member of the project cannot read the passphrase."""
        member = self._need(self.member)
        try:
            self.keymgr.get_vtpm_secret(member, self.instance)
        except exception.VTPMSecretForbidden as exc:
            status = http_status_of(exc)
            return (f"{_who(member)} is forbidden to read the secret "
                    f"({status + ', ' if status else ''}{type(exc).__name__})")
        except exception.VTPMError as exc:
            raise CheckFailed(f"expected VTPMSecretForbidden, got {type(exc).__name__}: "
                              f"{_one_line(exc)}") from None
        # The value is never shown, not even its length.
        raise CheckFailed(f"{_who(member)} COULD read the passphrase: the owner-only ACL is "
                          "not in force")

    def member_hard_reboots(self) -> str:
        """SPEC F5: refused, and the server is exactly as it was."""
        member = self._need(self.member)
        instance = self.backend.find(self.instance.uuid)
        dom_id, console = self._domain_id(), self._console_text()
        try:
            self.backend.driver.reboot(member, instance, None, "HARD")
        except exception.VTPMSecretForbidden as exc:
            refusal = type(exc).__name__
        except exception.VTPMError as exc:
            raise CheckFailed(f"expected VTPMSecretForbidden, got {type(exc).__name__}: "
                              f"{_one_line(exc)}") from None
        else:
            raise CheckFailed(f"hard reboot by {_who(member)} was ACCEPTED")
        changes = []
        now_id = self._domain_id()
        if now_id is None:
            changes.append("the guest is no longer running")
        elif now_id != dom_id:
            changes.append(f"the guest was restarted (domain id {dom_id} -> {now_id})")
        if results_since(console, self._console_text()):
            changes.append("the guest booted again")
        try:
            self._check_no_libvirt_secret("after the refused reboot")
        except CheckFailed as exc:
            changes.append(str(exc))
        if changes:
            raise CheckFailed(f"refused ({refusal}) but the server changed: "
                              + "; ".join(changes))
        return (f"refused ({refusal}); server unchanged (still running, same QEMU process, "
                "no new boot, no libvirt secret left)")

    def owner_hard_reboots(self) -> str:
        """SPEC F2: the TPM state (hence its endorsement key) survives a hard reboot."""
        owner = self._need(self.owner)
        instance = self.backend.find(self.instance.uuid)
        dom_id, console = self._domain_id(), self._console_text()
        self.backend.driver.reboot(owner, instance, None, "HARD")
        after = self._wait_for_boot(console)
        if self._domain_id() == dom_id:
            raise CheckFailed(f"the guest printed again but runs in the same QEMU process "
                              f"(domain id {dom_id}): that was no hard reboot")
        problems = guest_problems(after)
        if problems:
            raise CheckFailed(f"after the reboot: {result_line(after)}: {'; '.join(problems)}")
        self._check_no_libvirt_secret("after the reboot")
        before = (self.first_boot or {}).get("ek")
        if before is None:
            raise CheckFailed(f"guest booted again (ek {short(after['ek'])}) but its first "
                              "boot was not seen, so nothing to compare with")
        if after["ek"] != before:
            raise CheckFailed(f"TPM identity CHANGED: ek {short(before)} before, "
                              f"{short(after['ek'])} after (the state was lost)")
        return (f"guest booted again in a new QEMU process; TPM identity kept "
                f"(ek {short(before)} before and after)")

    def delete(self) -> str:
        """SPEC F3: domain, libvirt secret, state directory and Barbican secret all gone."""
        owner = self._need(self.owner)
        instance = self.backend.find(self.instance.uuid)
        self.backend.driver.destroy(owner, instance, None, None, True, True)
        left = self.leftovers()
        if left:
            raise CheckFailed("still there: " + "; ".join(left))
        self.deleted = True
        return ("nothing left: no domain, no libvirt secret, no state dir, Barbican "
                "secret gone (HTTP 404)")

    # -- clean-up -----------------------------------------------------------

    def leftovers(self) -> list[str]:
        """What of the demo server still exists, anywhere."""
        found = []
        uuid = self.instance.uuid
        try:
            virt_guest.lookup(self.backend.hypervisor.conn, uuid)
            found.append(f"domain {uuid}")
        except exception.InstanceNotFound:
            pass
        conn = self.backend.hypervisor.conn
        if virt_secret.lookup_vtpm_secret_by_instance(conn, uuid) is not None:
            found.append(f"libvirt vtpm secret of {uuid}")
        if self.secret_uuid and virt_secret.lookup_vtpm_secret(conn, self.secret_uuid):
            found.append(f"libvirt secret {self.secret_uuid}")
        state_dir = virt_state.state_dir(self.conf.vtpm.swtpm_state_dir, uuid)
        if state_dir.exists():
            found.append(f"state dir {state_dir}")
        if self.secret_uuid and self.owner is not None:
            resp = self._barbican_get(self.owner, f"secrets/{self.secret_uuid}",
                                      "look for the secret")
            if resp.status_code != 404:
                found.append(f"Barbican secret {self.secret_uuid} (HTTP {resp.status_code})")
        return found

    def cleanup(self) -> StepResult | None:
        """Delete the demo server if a step left it; None when there is nothing to do."""
        if self.instance is None or self.deleted:
            return None
        started = time.monotonic()
        notes = []
        try:
            with self.reporter.running("cleanup"):
                notes = self._remove_everything()
                left = self.leftovers()
        except (CheckFailed, exception.VTPMError) as exc:
            return StepResult("cleanup", FAIL, time.monotonic() - started,
                              f"could not check or remove demo server {self.name}: "
                              f"{_one_line(exc)}")
        elapsed = time.monotonic() - started
        if left:
            return StepResult("cleanup", FAIL, elapsed,
                              "left behind, remove by hand: " + "; ".join(left + notes))
        self.deleted = True
        suffix = f" ({'; '.join(notes)})" if notes else ""
        return StepResult("cleanup", OK, elapsed,
                          f"nothing of demo server {self.name} ({self.instance.uuid}) "
                          f"left{suffix}")

    def _remove_everything(self) -> list[str]:
        """The driver's delete; then, if it failed, each piece by hand."""
        notes = []
        owner = self.owner
        try:
            if owner is None:
                raise CheckFailed("not logged in")
            instance = self.backend.find(self.instance.uuid)
            self.backend.driver.destroy(owner, instance, None, None, True, True)
            return notes
        except exception.InstanceNotFound:
            instance = self.instance  # never defined, or already gone
        except (CheckFailed, exception.VTPMError) as exc:
            notes.append(f"driver delete failed: {_one_line(exc)}")
            instance = self.instance
        conn = self.backend.hypervisor.conn
        with contextlib.suppress(exception.InstanceNotFound):
            dom = virt_guest.lookup(conn, instance.uuid)
            virt_guest.destroy(dom)
            virt_guest.undefine(dom, keep_tpm=False)
        for info in virt_secret.list_vtpm_secrets(conn):
            if info.usage_id == instance.uuid or info.uuid == self.secret_uuid:
                virt_secret.undefine_vtpm_secret(conn, info.uuid)
        virt_state.remove_state(self.conf.vtpm.swtpm_state_dir, instance.uuid)
        if owner is not None and self.secret_uuid:
            instance.system_metadata.setdefault(keymgr.SYSMETA_KEY, self.secret_uuid)
            self.keymgr.delete_vtpm_secret(owner, instance)
        return notes

    # -- helpers ------------------------------------------------------------

    @staticmethod
    def _need(value: Any) -> Any:
        if value is None:
            raise CheckFailed("an earlier step did not complete")
        return value

    def _console_log(self) -> str:
        path = getattr(self.instance, "console_log", None)
        if not path:
            raise CheckFailed(f"server {self.name} has no console log path")
        return str(path)

    def _console_text(self) -> str:
        """The console log so far ('' before QEMU has created it)."""
        path = self._console_log()
        try:
            return Path(path).read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise CheckFailed(f"cannot read console log {path}: {exc.strerror}") from None

    def _domain_id(self) -> int | None:
        """libvirt's id of the running domain (a new QEMU process gets a new one)."""
        try:
            dom = virt_guest.lookup(self.backend.hypervisor.conn, self.instance.uuid)
        except exception.InstanceNotFound:
            return None
        return dom.ID() if virt_guest.is_active(dom) else None

    def _wait_for_boot(self, before: str) -> dict[str, str]:
        """The first result line printed after the console showed ``before``."""
        deadline = time.monotonic() + self.boot_timeout
        while True:
            results = results_since(before, self._console_text())
            if results:
                return results[0]
            if self._domain_id() is None:
                raise CheckFailed(self._no_result("the guest stopped without printing"))
            if time.monotonic() > deadline:
                raise CheckFailed(self._no_result(
                    f"no VTPM_RESULT line within {self.boot_timeout:g} s (--boot-timeout)"))
            time.sleep(_POLL_INTERVAL)

    def _no_result(self, what: str) -> str:
        try:
            text = self._console_text()
        except CheckFailed:
            text = ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        tail = lines[-1][:160] if lines else "(empty)"
        return f"{what}; console {self._console_log()} ends with: {tail}"

    def _check_no_libvirt_secret(self, when: str) -> None:
        conn = self.backend.hypervisor.conn
        found = [info.uuid for info in virt_secret.list_vtpm_secrets(conn)
                 if info.usage_id == self.instance.uuid or info.uuid == self.secret_uuid]
        if found:
            raise CheckFailed(f"libvirt still holds vtpm secret {', '.join(found)} {when}")

    def _barbican_get(self, context: RequestContext, path: str, what: str
                      ) -> requests.Response:
        """One GET to Barbican with ``context``'s token (no Keystone round trip)."""
        auth = context.barbican_auth(self.conf)
        root = keymgr.api_root(str(auth.endpoint))
        try:
            return self._http.get(f"{root}/{keymgr.API_VERSION}/{path}", auth=auth,
                                  raise_exc=False, log=False, connect_retries=0,
                                  headers={"Accept": "application/json"})
        except ks_exc.ConnectionError as exc:
            raise exception.KeyManagerUnavailable(
                f"cannot reach Barbican at {root} to {what}: {type(exc).__name__}") from None

    def _barbican_json(self, context: RequestContext, path: str, what: str
                       ) -> dict[str, Any]:
        resp = self._barbican_get(context, path, what)
        if resp.status_code != 200:
            raise CheckFailed(f"Barbican refused to {what} for {_who(context)} "
                              f"(HTTP {resp.status_code})")
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise CheckFailed(f"Barbican answered a non-JSON body to {what}")
        return body


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _who(context: RequestContext) -> str:
    return context.user_name or context.user_id


def _project(context: RequestContext) -> str:
    return context.project_name or context.project_id


# --------------------------------------------------------------------------- command


class Demo(Command):
    """Show, and check, what vtpm-driver does on this host, in about 15 seconds.

    As the regular user given by the OS_* variables (or --os-* options), the
    demo creates a server with an emulated TPM 2.0 on the CRB interface
    (secret security 'user'), booting the test guest of tools/build-guest.sh
    in its 'stay' mode, then shows, one line per step with its duration:

      host check            the host offers the TPM traits the server needs
      log in                the owner, and another member of the same project
      create server         as the owner: the Barbican secret, then the guest
      guest saw             the guest's own report (VTPM_RESULT line)
      key in Barbican       the passphrase's secret, its type, its owner-only
                            read ACL (read with the owner's token)
      key not in libvirt    no libvirt secret left once the guest runs
      state on disk         the swtpm state file is encrypted
      member reads the key  another user of the same project is forbidden
      member hard-reboots   ... and cannot restart the server, which is left
                            unchanged
      owner hard-reboots    the TPM's endorsement key (its identity) is kept
      delete                nothing is left: domain, libvirt secret, state
                            directory, Barbican secret

    The other user's credentials come from a clouds.yaml file (--clouds-file,
    --member-cloud; tools/keymgr-stack.sh writes one with a 'member' cloud).
    tools/demo.sh prepares the host and runs this command with the local
    stack's credentials.

    The demo server is deleted at the end whatever happens (also on Ctrl-C or
    SIGTERM). Exit status: 0 every check held; 1 a check failed (each failed
    step says what was seen, and one line on stderr names the first); 2 usage
    error.
    """

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.formatter_class = _keep_description_layout(parser.formatter_class)
        parser.add_argument(
            "--clouds-file", metavar="PATH",
            default=os.environ.get("OS_CLIENT_CONFIG_FILE") or DEFAULT_CLOUDS_FILE,
            help="clouds.yaml holding the other user's credentials (default: "
                 f"$OS_CLIENT_CONFIG_FILE, else {DEFAULT_CLOUDS_FILE})")
        parser.add_argument(
            "--member-cloud", metavar="NAME", default=DEFAULT_MEMBER_CLOUD,
            help="Cloud in --clouds-file for another user of the owner's project: the "
                 f"one who must not unlock the server (default: {DEFAULT_MEMBER_CLOUD})")
        parser.add_argument(
            "--guest-dir", metavar="DIR",
            default=os.environ.get("VTPM_GUEST_DIR") or DEFAULT_GUEST_DIR,
            help="Directory with the test guest's vmlinuz and initrd.img (default: "
                 f"$VTPM_GUEST_DIR, else {DEFAULT_GUEST_DIR})")
        parser.add_argument(
            "--boot-timeout", metavar="SECONDS", type=_positive_float,
            default=DEFAULT_BOOT_TIMEOUT,
            help="Seconds to wait for the guest to report its TPM after each start "
                 f"(default {DEFAULT_BOOT_TIMEOUT})")
        server_cli.add_auth_options(parser)
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        conf = self.app.conf
        clouds_file = parsed_args.clouds_file
        member_cloud = parsed_args.member_cloud
        # Fail on a bad clouds file before anything is created.
        member_creds = cloud_credentials(load_clouds_file(clouds_file), member_cloud,
                                         clouds_file)
        stream = self.app.stdout
        reporter = Reporter(stream, live=_isatty(stream))
        backend = server_cli.backend_factory(conf)
        run = DemoRun(
            conf, backend, reporter,
            owner_login=lambda: server_cli.authenticate(parsed_args),
            member_login=lambda: RequestContext.from_credentials(
                **member_creds, timeout=float(conf.key_manager.timeout)),
            probe_factory=self.app.probe_factory,
            guest_dir=Path(parsed_args.guest_dir),
            boot_timeout=parsed_args.boot_timeout,
        )
        reporter.write(
            "vtpm-driver demo: a server with a TPM 2.0 (CRB) whose key only its owner can "
            "unlock")
        reporter.write(
            f"  server {run.name} on {backend.uri} (virt_type {conf.libvirt.virt_type}); "
            f"Barbican {conf.key_manager.barbican_endpoint or 'from the service catalog'}; "
            f"other user: cloud '{member_cloud}' of {clouds_file}")
        started = time.monotonic()
        try:
            with _terminate_as_exit():
                results = run.run()
        finally:
            backend.close()
        elapsed = time.monotonic() - started
        failed = [result for result in results if result.status != OK]
        checks = [result for result in results if result.title != "cleanup"]
        if not failed:
            reporter.write(f"PASS: all {len(checks)} checks held in {elapsed:.1f} s")
            return 0
        bad = [result for result in failed if result.status == FAIL]
        reporter.write(
            f"FAIL: {len(bad)} failed, {len(failed) - len(bad)} not run, of "
            f"{len(checks)} checks ({elapsed:.1f} s): {', '.join(r.title for r in bad)}")
        first = bad[0] if bad else failed[0]
        raise exception.VTPMError(f"demo failed at '{first.title}': {first.detail}")


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so the demo server is still cleaned up."""

    def on_term(signum: int, _frame: object) -> NoReturn:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _keep_description_layout(formatter: type) -> type:
    """cliff's help formatter, but the description keeps its lines (the step table)."""
    return type("DemoHelpFormatter", (formatter,), {
        "_fill_text": argparse.RawDescriptionHelpFormatter._fill_text})


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


COMMANDS = {
    "demo": Demo,
}
