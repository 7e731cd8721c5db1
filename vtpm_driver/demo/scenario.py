"""The demo's steps: the whole story on this host, each one a check.

As a regular user (the owner), create a TPM 2.0 (CRB) server; show what the
guest saw, where its key lives (Barbican only, readable by the owner only;
nothing in libvirt; the state on disk encrypted); show that another member of
the same project can neither read the key nor restart the server; that a hard
reboot by the owner keeps the TPM's identity; and that deleting the server
leaves nothing behind. The demo server is deleted whatever happens.

It drives the same code as ``server create|reboot|delete`` (the driver and the
server records), in one process, so each step can be timed and checked
against libvirt, the swtpm state directory and Barbican directly.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid as uuid_mod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oslo_config import cfg

from vtpm_driver import exception, keymgr
from vtpm_driver.demo import inspect
from vtpm_driver.demo.report import FAIL, OK, SKIP, Reporter, StepResult
from vtpm_driver.guestreport import result_line, results_since, tpm_of
from vtpm_driver.keymgr.context import RequestContext
from vtpm_driver.model import request
from vtpm_driver.model.hostcheck import check_host
from vtpm_driver.model.server import SYSMETA_KEY, recorded_secret

GUEST_CMDLINE = "console=ttyS0 vtpm_test=stay"
NAME_PREFIX = "vtpm-demo-"
# What the demo asks for, and what the guest and Barbican must then show.
FLAVOR_EXTRA_SPECS = {
    request.FLAVOR_VERSION_KEY: request.VERSION_2_0,
    request.FLAVOR_MODEL_KEY: request.MODEL_CRB,
    request.FLAVOR_SECRET_SECURITY_KEY: request.SECRET_USER,
}
EXPECTED_GUEST = {"version": "2", "driver": "tpm_crb", "getrandom_rc": "0"}
EXPECTED_SECRET_NAME = "vTPM secret for instance {}"  # Nova's name for it
EXPECTED_SECRET_TYPE = "passphrase"

_HTTP_STATUS_RE = re.compile(r"\(HTTP (\d{3})\)")
_POLL_INTERVAL = 0.2


class CheckFailed(Exception):
    """A demo check did not hold; the message says what was seen instead."""


def guest_problems(result: dict[str, str]) -> list[str]:
    """How a guest's result differs from a working TPM 2.0 on the CRB interface."""
    problems = [f"{key}={result.get(key, 'missing')} (expected {key}={want})"
                for key, want in EXPECTED_GUEST.items() if result.get(key) != want]
    ek = result.get("ek", "")
    if not re.fullmatch(r"[0-9a-f]{64}", ek):
        problems.append(f"ek={ek or 'missing'} (expected the SHA-256 of the TPM's EK)")
    sealed = result.get("sealed", "")
    if not re.fullmatch(r"[0-9a-f]{64}", sealed):
        problems.append(f"sealed={sealed or 'missing'} (expected the SHA-256 of the value "
                        "the guest sealed in its TPM)")
    return problems


def short(digest: str) -> str:
    """First 16 hex digits: enough to compare two identities by eye."""
    return digest[:16] + "..." if len(digest) > 16 else digest


def http_status_of(error: BaseException) -> str:
    """``HTTP 403`` from one of our key manager errors, or '' if it names none."""
    match = _HTTP_STATUS_RE.search(str(error))
    return f"HTTP {match.group(1)}" if match else ""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _who(context: RequestContext) -> str:
    return context.user_name or context.user_id


def _project(context: RequestContext) -> str:
    return context.project_name or context.project_id


@dataclasses.dataclass(frozen=True)
class Step:
    title: str
    run: Callable[[], str]
    required: bool = False  # when it fails, the later steps cannot mean anything


class DemoRun:
    """The demo's steps and their shared state (server, contexts, first boot)."""

    def __init__(self, conf: cfg.ConfigOpts, backend: Any, reporter: Reporter, *,
                 owner_login: Callable[[], RequestContext],
                 member_login: Callable[[], RequestContext],
                 probe_factory: Callable[[cfg.ConfigOpts], Any],
                 guest_dir: Path, boot_timeout: float, name: str | None = None) -> None:
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
        self.state_base = str(conf.vtpm.swtpm_state_dir)
        self.owner: RequestContext | None = None
        self.member: RequestContext | None = None
        self.instance: Any = None
        self.secret_uuid: str | None = None
        self.first_boot: dict[str, str] | None = None
        self.deleted = False

    @property
    def conn(self) -> Any:
        return self.backend.hypervisor.conn

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
        needed = request.required_traits(FLAVOR_EXTRA_SPECS, {})
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
        self.owner = owner = self._owner_login()
        self.member = member = self._member_login()
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
            self.name, owner, flavor_extra_specs=dict(FLAVOR_EXTRA_SPECS), image_properties={},
            kernel=str(kernel), initrd=str(initrd), cmdline=GUEST_CMDLINE,
            disk=None, vcpus=1, memory_mb=256, console_log=None)
        self.backend.driver.spawn(owner, self.instance, self.instance.image_meta, [], None, {})
        self.secret_uuid = recorded_secret(self.instance)
        if not self.secret_uuid:
            raise CheckFailed(f"server {self.name} started but records no "
                              f"system_metadata['{SYSMETA_KEY}']")
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
        try:
            view = inspect.view_secret(self.conf, owner, secret_uuid)
        except inspect.BarbicanRefused as exc:
            raise CheckFailed(str(exc)) from None
        problems = []
        want_name = EXPECTED_SECRET_NAME.format(self.instance.uuid)
        if view.name != want_name:
            problems.append(f"name {view.name!r} (expected {want_name!r})")
        if view.secret_type != EXPECTED_SECRET_TYPE:
            problems.append(f"type {view.secret_type!r} (expected {EXPECTED_SECRET_TYPE})")
        if view.read_project_access is not False:
            problems.append(f"read ACL project-access {view.read_project_access!r} "
                            "(expected false)")
        if list(view.read_users) != [owner.user_id]:
            problems.append(f"read ACL users {list(view.read_users)} (expected only the owner "
                            f"{owner.user_id})")
        if problems:
            raise CheckFailed(f"Barbican secret {secret_uuid}: " + "; ".join(problems))
        return (f"secret {secret_uuid} '{view.name}', type {view.secret_type}; "
                f"read ACL: project-access false, users [{_who(owner)}] only")

    def key_not_in_libvirt(self) -> str:
        """SPEC E3: in user mode libvirt forgets the key once swtpm has it."""
        self._check_no_libvirt_secret("after the start")
        return "no vtpm secret defined (handed to swtpm at start, then undefined)"

    def state_on_disk(self) -> str:
        try:
            path, header = inspect.state_header(self.state_base, self.instance.uuid,
                                                request.VERSION_2_0)
        except exception.VTPMError as exc:
            raise CheckFailed(str(exc)) from None
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
        if self.first_boot is None:
            raise CheckFailed(f"guest booted again (ek {short(after['ek'])}) but its first "
                              "boot was not seen, so nothing to compare with")
        before, now = tpm_of(self.first_boot), tpm_of(after)
        if now.ek != before.ek:
            raise CheckFailed(f"TPM identity CHANGED: ek {short(before.ek)} before, "
                              f"{short(now.ek)} after (the state was lost)")
        if now.sealed != before.sealed:
            raise CheckFailed(f"what the guest sealed in its TPM CHANGED: sealed "
                              f"{short(before.sealed)} before, {now.sealed} after")
        return (f"guest booted again in a new QEMU process; TPM identity kept "
                f"(ek {short(before.ek)} before and after) and the value it sealed to "
                f"PCR 7 unsealed again (sealed {short(before.sealed)})")

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
                "secret gone (no longer listed)")

    # -- clean-up -----------------------------------------------------------

    def leftovers(self) -> list[str]:
        """What of the demo server still exists, anywhere."""
        uuid = self.instance.uuid
        found = [f"domain {uuid}"] if inspect.domain_exists(self.conn, uuid) else []
        found += [f"libvirt vtpm secret {secret_uuid}" for secret_uuid
                  in inspect.libvirt_secrets_of(self.conn, uuid, self.secret_uuid)]
        state_dir = inspect.state_dir_left(self.state_base, uuid)
        if state_dir:
            found.append(f"state dir {state_dir}")
        if self.secret_uuid and self.owner is not None and inspect.secret_listed(
                self.keymgr, self.owner, self.secret_uuid):
            found.append(f"Barbican secret {self.secret_uuid}")
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
        inspect.remove_by_hand(self.conn, self.state_base, instance.uuid, self.secret_uuid)
        if owner is not None and self.secret_uuid:
            instance.system_metadata.setdefault(SYSMETA_KEY, self.secret_uuid)
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
        return inspect.domain_id(self.conn, self.instance.uuid)

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
        found = inspect.libvirt_secrets_of(self.conn, self.instance.uuid, self.secret_uuid)
        if found:
            raise CheckFailed(f"libvirt still holds vtpm secret {', '.join(found)} {when}")
