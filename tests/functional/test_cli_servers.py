"""`vtpm-driver server ...` and `vtpm-driver audit` through the installed command.

Every call is a subprocess of the real ``vtpm-driver`` script with credentials
from the stack's ``openrc-<cloud>`` files, against the real libvirtd, QEMU,
swtpm, Keystone and Barbican. Servers boot the test guest (tools/guest), which
prints one VTPM_RESULT line and powers itself off (or, with
``vtpm_test=stay``, keeps running).

The refusal of ``virsh secret-get-value`` on a private vTPM secret is covered
by tests/functional/test_virt.py (test_private_secret_value_cannot_be_read).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets as pysecrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest
from keystoneauth1 import session as ks_session

from tests.functional.fixtures_keymgr import (
    BARBICAN_URL,
    AccessLogCounter,
    KeymgrStack,
)
from tests.functional.fixtures_libvirt import (
    LIBVIRT_URI,
    SWTPM_STATE_ROOT,
    Cleanup,
    TestGuest,
    last_vtpm_result,
    wait_for_shutoff,
)
from tests.functional.support import unavailable
from vtpm_driver.virt import secret as virt_secret
from vtpm_driver.virt import state as virt_state

# Counts the shared Keystone/Barbican's requests or lists every secret: run alone.
pytestmark = [pytest.mark.functional, pytest.mark.alone]

CLI = Path(sys.executable).with_name("vtpm-driver")
CLI_TIMEOUT = 300  # a bound for a hung command, not a speed check
SECRET_NAME_PREFIX = "vTPM secret for instance "
# Guest VTPM_RESULT `version` values for each requested TPM version.
GUEST_VERSION = {"1.2": "1.2", "2.0": "2"}
GUEST_DRIVER = {"tpm-tis": "tpm_tis", "tpm-crb": "tpm_crb"}


# ----------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class Result:
    """One finished ``vtpm-driver`` run."""

    argv: list[str]
    rc: int
    out: str
    err: str

    def json(self) -> object:
        assert self.rc == 0, f"{self.argv} exited {self.rc}: {self.err}"
        return json.loads(self.out)  # the whole of stdout must be JSON

    def one_error_line(self) -> str:
        """The single stderr line of a refused command (exit 1, nothing on stdout)."""
        assert self.rc == 1, f"{self.argv} exited {self.rc}: {self.out}{self.err}"
        assert self.out == ""
        lines = self.err.splitlines()
        assert len(lines) == 1, f"expected one stderr line, got:\n{self.err}"
        assert lines[0].startswith("vtpm-driver: error: ")
        return lines[0]


def openrc_env(stack_dir: Path, cloud: str) -> dict[str, str]:
    """The variables ``openrc-<cloud>`` exports (``export K=V`` lines)."""
    env = {}
    for line in (stack_dir / f"openrc-{cloud}").read_text().splitlines():
        line = line.strip()
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            words = shlex.split(value)
            env[key.strip()] = words[0] if words else ""
    return env


@dataclasses.dataclass
class CliRunner:
    """Runs the installed ``vtpm-driver`` with one config file and a cloud's openrc."""

    config_file: Path
    stack_dir: Path
    console_dir: Path
    outputs: list[str] = dataclasses.field(default_factory=list)

    def env(self, cloud: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
        if cloud is not None:
            env.update(openrc_env(self.stack_dir, cloud))
        return env

    def password(self, cloud: str) -> str:
        return openrc_env(self.stack_dir, cloud)["OS_PASSWORD"]

    def popen(self, *args: str, cloud: str | None = "owner") -> subprocess.Popen:
        argv = [str(CLI), "--config-file", str(self.config_file), *args]
        return subprocess.Popen(argv, env=self.env(cloud), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def finish(self, proc: subprocess.Popen) -> Result:
        out, err = proc.communicate(timeout=CLI_TIMEOUT)
        self.outputs.append(out + err)
        return Result(list(proc.args), proc.returncode, out, err)

    def __call__(self, *args: str, cloud: str | None = "owner") -> Result:
        return self.finish(self.popen(*args, cloud=cloud))


@pytest.fixture(scope="module")
def cli(keymgr_stack: KeymgrStack, tmp_path_factory: pytest.TempPathFactory) -> CliRunner:
    """The command, configured for this host (swtpm on, TCG guests, local Barbican)."""
    if not CLI.is_file():
        unavailable(f"{CLI} is not installed (pip install -e . in this virtualenv)")
    root = tmp_path_factory.mktemp("cli")
    console_dir = root / "console"
    console_dir.mkdir()
    config = root / "vtpm-driver.conf"
    config.write_text(
        "[libvirt]\n"
        "swtpm_enabled = True\n"
        "virt_type = qemu\n"
        f"connection_uri = {LIBVIRT_URI}\n"
        "[key_manager]\n"
        f"barbican_endpoint = {BARBICAN_URL}\n"
        "[vtpm]\n"
        f"swtpm_state_dir = {SWTPM_STATE_ROOT}\n"
        f"console_log_dir = {console_dir}\n"
    )
    return CliRunner(config, keymgr_stack.stack_dir, console_dir)


@pytest.fixture(scope="module")
def owner_session(keymgr_stack: KeymgrStack) -> ks_session.Session:
    """The owner's keystoneauth1 session, to look at Barbican directly."""
    from tests.functional.fixtures_keymgr import password_auth

    env = openrc_env(keymgr_stack.stack_dir, "owner")
    creds = {
        "auth_url": env["OS_AUTH_URL"], "username": env["OS_USERNAME"],
        "password": env["OS_PASSWORD"], "project_name": env["OS_PROJECT_NAME"],
        "user_domain_name": env.get("OS_USER_DOMAIN_NAME", "Default"),
        "project_domain_name": env.get("OS_PROJECT_DOMAIN_NAME", "Default"),
    }
    return ks_session.Session(auth=password_auth(creds))


def barbican_status(session: ks_session.Session, secret_uuid: str) -> int:
    """HTTP status of the secret's metadata (200 exists, 404 gone)."""
    resp = session.get(f"{BARBICAN_URL}/v1/secrets/{secret_uuid}", raise_exc=False,
                       headers={"Accept": "application/json"})
    return resp.status_code


def barbican_passphrase(session: ks_session.Session, secret_uuid: str) -> str:
    resp = session.get(f"{BARBICAN_URL}/v1/secrets/{secret_uuid}/payload",
                       headers={"Accept": "text/plain"})
    return resp.text


def domain_exists(conn: libvirt.virConnect, name_or_uuid: str) -> bool:
    lookup = conn.lookupByUUIDString if _is_uuid(name_or_uuid) else conn.lookupByName
    try:
        lookup(name_or_uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise
    return True


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


class Servers:
    """Servers a test created; deleted (through the CLI, then by hand) at teardown."""

    def __init__(self, cli: CliRunner, cleanup: Cleanup, session: ks_session.Session) -> None:
        self._cli = cli
        self._cleanup = cleanup
        self._session = session
        self._made: list[dict] = []

    def name(self) -> str:
        return f"cli-{uuid.uuid4().hex[:10]}"

    def created(self, shown: dict) -> dict:
        """Register the output of ``server create -f json``."""
        self._cleanup.domain(shown["uuid"])
        if shown.get("vtpm_secret_uuid"):
            self._cleanup.secret(shown["vtpm_secret_uuid"])
        self._made.append(shown)
        return shown

    def teardown(self) -> None:
        for shown in self._made:
            self._cli("server", "delete", shown["uuid"])  # no-op (exit 1) when already gone
            if shown.get("vtpm_secret_uuid"):
                self._session.delete(f"{BARBICAN_URL}/v1/secrets/{shown['vtpm_secret_uuid']}",
                                     raise_exc=False)


@pytest.fixture
def made(cli: CliRunner, cleanup: Cleanup, owner_session: ks_session.Session
         ) -> Iterator[Servers]:
    registry = Servers(cli, cleanup, owner_session)
    yield registry
    registry.teardown()


def create_args(guest: TestGuest, name: str, console_log: Path, *extra: str,
                cmdline: str | None = None) -> list[str]:
    return [
        "server", "create", name, "--kernel", str(guest.kernel), "--initrd", str(guest.initrd),
        "--cmdline", cmdline or guest.cmdline, "--console-log", str(console_log),
        "--memory", "256", *extra, "-f", "json",
    ]


def assert_all_gone(conn: libvirt.virConnect, session: ks_session.Session, shown: dict) -> None:
    """SPEC F3: domain, libvirt secret, swtpm state and Barbican secret are gone."""
    assert not domain_exists(conn, shown["uuid"])
    assert virt_secret.lookup_vtpm_secret_by_instance(conn, shown["uuid"]) is None
    assert not (SWTPM_STATE_ROOT / shown["uuid"]).exists()
    if shown.get("vtpm_secret_uuid"):
        assert virt_secret.lookup_vtpm_secret(conn, shown["vtpm_secret_uuid"]) is None
        assert barbican_status(session, shown["vtpm_secret_uuid"]) == 404


# ----------------------------------------------------------------------------- create / delete


@pytest.mark.parametrize(
    ("props", "version", "model"),
    [
        (["--flavor-property", "hw:tpm_version=1.2"], "1.2", "tpm-tis"),
        (["--flavor-property", "hw:tpm_version=2.0"], "2.0", "tpm-tis"),
        (["--flavor-property", "hw:tpm_version=2.0", "--flavor-property",
          "hw:tpm_model=tpm-crb"], "2.0", "tpm-crb"),
        (["--image-property", "hw_tpm_version=2.0"], "2.0", "tpm-tis"),
        (["--flavor-property", "hw:tpm_version=2.0", "--flavor-property",
          "hw:tpm_pcr_banks=sha384,sha256"], "2.0", "tpm-tis"),
    ],
    ids=["1.2-tis", "2.0-tis", "2.0-crb", "image-2.0", "2.0-banks"],
)
def test_create_boots_the_requested_tpm_and_delete_removes_everything(
    cli: CliRunner, made: Servers, test_guest: TestGuest, libvirt_conn: libvirt.virConnect,
    owner_session: ks_session.Session, tmp_path: Path, props: list[str], version: str,
    model: str,
) -> None:
    name = made.name()
    console_log = tmp_path / "console.log"
    result = cli(*create_args(test_guest, name, console_log, *props))
    shown = made.created(result.json())
    assert result.err == ""  # not a terminal: no progress lines
    assert (shown["name"], shown["vtpm"], shown["vtpm_version"], shown["vtpm_model"],
            shown["secret_security"]) == (name, True, version, model, "user")
    owner = openrc_env(cli.stack_dir, "owner")
    assert (shown["user_name"], shown["project_name"]) == (
        owner["OS_USERNAME"], owner["OS_PROJECT_NAME"])
    assert shown["console_log"] == str(console_log)
    secret_uuid = shown["vtpm_secret_uuid"]
    assert _is_uuid(secret_uuid)

    wait_for_shutoff(libvirt_conn.lookupByUUIDString(shown["uuid"]))
    seen = last_vtpm_result(console_log)
    assert (seen["version"], seen["driver"], seen["getrandom_rc"]) == (
        GUEST_VERSION[version], GUEST_DRIVER[model], "0")
    # the guest sees exactly the banks asked for (swtpm's default: sha256; 1.2: none)
    asked = [p.split("=", 1)[1] for p in props if p.startswith("hw:tpm_pcr_banks=")]
    assert seen["banks"] == ("sha256,sha384" if asked else
                             "sha256" if version == "2.0" else "none"), seen
    state_file = virt_state.state_file(SWTPM_STATE_ROOT, shown["uuid"], version)
    assert virt_state.is_encrypted(state_file)
    # user mode: the libvirt secret was undefined right after the start (E3)
    assert virt_secret.lookup_vtpm_secret_by_instance(libvirt_conn, shown["uuid"]) is None
    assert barbican_status(owner_session, secret_uuid) == 200

    listed = {row["UUID"]: row for row in cli("server", "list", "-f", "json").json()}
    assert listed[shown["uuid"]]["Name"] == name
    assert listed[shown["uuid"]]["vTPM Version"] == version
    assert listed[shown["uuid"]]["Power State"] == "shutdown"
    again = cli("server", "show", name, "-f", "json").json()
    assert again["vtpm_secret_uuid"] == secret_uuid and again["power_state"] == "shutdown"

    deleted = cli("server", "delete", name)
    assert (deleted.rc, deleted.out, deleted.err) == (0, "", "")
    assert_all_gone(libvirt_conn, owner_session, shown)
    line = cli("server", "delete", name).one_error_line()
    assert name in line and "no server" in line


@pytest.mark.parametrize(
    ("props", "needle"),
    [
        (["--flavor-property", "hw:tpm_version=2.0", "--image-property", "hw_tpm_version=1.2"],
         "conflicts with image hw_tpm_version='1.2'"),
        (["--flavor-property", "hw:tpm_version=1.2", "--flavor-property",
          "hw:tpm_model=tpm-crb"], "tpm-crb needs TPM version 2.0"),
        (["--flavor-property", "hw:tpm_version=2.0", "--flavor-property",
          "hw:tpm_secret_security=nobody"], "invalid hw:tpm_secret_security='nobody'"),
        (["--image-property", "os_distro=windows", "--image-property", "os_version=11",
          "--flavor-property", "hw:tpm_version=2.0"],
         "the image is Windows 11 (os_distro=windows, os_version='11'), which needs UEFI "
         "firmware (image hw_firmware_type=uefi); Secure Boot"),
        (["--image-property", "vtpm_guest_os=windows11", "--image-property",
          "hw_firmware_type=uefi", "--flavor-property", "os:secure_boot=required"],
         "which needs a TPM 2.0 (flavor hw:tpm_version=2.0)"),
    ],
    ids=["conflict", "1.2-crb", "bad-secret-mode", "windows11-no-uefi", "windows11-no-tpm"],
)
def test_invalid_request_creates_nothing(
    cli: CliRunner, made: Servers, test_guest: TestGuest, libvirt_conn: libvirt.virConnect,
    keymgr_stack: KeymgrStack, tmp_path: Path, props: list[str], needle: str,
) -> None:
    name = made.name()
    counter = AccessLogCounter(keymgr_stack.stack_dir)
    line = cli(*create_args(test_guest, name, tmp_path / "console.log", *props)
               ).one_error_line()
    assert needle in line
    assert not domain_exists(libvirt_conn, name)
    # refused before anyone was asked: no login, no Barbican secret
    assert counter.barbican("POST") == 0
    assert counter.keystone("POST") == 0
    assert not (tmp_path / "console.log").exists()


# ----------------------------------------------------------------------------- ownership


def test_hard_reboot_by_another_member_is_refused_and_changes_nothing(
    cli: CliRunner, made: Servers, test_guest: TestGuest, libvirt_conn: libvirt.virConnect,
    tmp_path: Path,
) -> None:
    name = made.name()
    console_log = tmp_path / "console.log"
    shown = made.created(cli(*create_args(
        test_guest, name, console_log, "--flavor-property", "hw:tpm_version=2.0",
        cmdline=f"{test_guest.cmdline} vtpm_test=stay")).json())
    dom = libvirt_conn.lookupByUUIDString(shown["uuid"])
    _wait_for_console(dom, console_log, "vtpm-guest: staying up")
    state_file = virt_state.state_file(SWTPM_STATE_ROOT, shown["uuid"], "2.0")
    before = (dom.ID(), dom.XMLDesc(0), state_file.read_bytes(),
              cli("server", "show", name, "-f", "json").json())

    line = cli("server", "reboot", "--hard", name, cloud="member").one_error_line()
    assert "owner's credentials" in line

    # Every other operation that needs the passphrase ('user' mode: only the owner can
    # read it) is refused for the member before the guest is touched (issue 15).
    for args, says in (
        (("server", "rescue", name), "owner's credentials"),
        (("server", "rebuild", name), "owner's credentials"),
        # Destroying the TPM needs its owner (or its project's admin) in every mode
        # (issue 20 defect 9): refused before the passphrase is even asked for.
        (("server", "rebuild", "--reset-tpm", name), "only its owner"),
    ):
        line = cli(*args, cloud="member").one_error_line()
        assert says in line, (args, line)
        assert name in line or shown["uuid"] in line, (args, line)  # names the server

    dom = libvirt_conn.lookupByUUIDString(shown["uuid"])
    assert dom.isActive()
    after = (dom.ID(), dom.XMLDesc(0), state_file.read_bytes(),
             cli("server", "show", name, "-f", "json").json())
    assert after == before  # same boot, domain, TPM state and server (not rescued)
    assert virt_secret.lookup_vtpm_secret_by_instance(libvirt_conn, shown["uuid"]) is None

    # The audit lists the server with its mode and secret, and nothing of it as orphan.
    report = cli("audit", "-f", "json").json()
    mine = [s for s in report["servers"] if s["uuid"] == shown["uuid"]]
    assert mine == [{
        "name": name, "uuid": shown["uuid"], "vtpm_version": "2.0", "vtpm_model": "tpm-tis",
        "secret_security": "user", "vtpm_secret_uuid": shown["vtpm_secret_uuid"],
        "problems": [],
    }]
    assert not [o for kind in ("orphan_libvirt_secrets", "orphan_state_dirs",
                               "orphan_barbican_secrets")
                for o in report[kind] if o["instance_uuid"] == shown["uuid"]]

    # Another project may not even stop it (Nova's owner-project-or-admin rule).
    line = cli("server", "stop", name, cloud="other").one_error_line()
    assert f"cannot stop server {name}: it belongs to project" in line
    dom = libvirt_conn.lookupByUUIDString(shown["uuid"])
    assert dom.isActive() and dom.ID() == before[0]

    # The owner may; the guest comes back with the same TPM.
    rebooted = cli("server", "reboot", "--hard", name)
    assert (rebooted.rc, rebooted.out, rebooted.err) == (0, "", "")
    dom = libvirt_conn.lookupByUUIDString(shown["uuid"])
    _wait_for_console(dom, console_log, "vtpm-guest: staying up")
    assert dom.ID() != before[0]


def _wait_for_console(dom: libvirt.virDomain, console_log: Path, needle: str) -> None:
    """Bounded wait for ``needle`` on the console (fails if the guest stops first)."""
    deadline = time.monotonic() + 180
    while True:
        text = console_log.read_text(errors="replace") if console_log.exists() else ""
        if needle in text:
            return
        if not dom.isActive() or time.monotonic() > deadline:
            raise AssertionError(f"no {needle!r} on the console; it ends with:\n{text[-3000:]}")
        time.sleep(0.2)


# ----------------------------------------------------------------------------- secrets


class CmdlineWatcher:
    """Collects the argv of every process while it runs (to look for secrets later)."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as handle:
                        self.seen.add(handle.read())
                except OSError:
                    continue
            self._stop.wait(0.05)

    def __enter__(self) -> CmdlineWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_no_passphrase_in_argv_or_output(
    cli: CliRunner, made: Servers, test_guest: TestGuest, libvirt_conn: libvirt.virConnect,
    owner_session: ks_session.Session, tmp_path: Path,
) -> None:
    name = made.name()
    console_log = tmp_path / "console.log"
    debug = ("--debug", "-v", "-v", "-v")
    with CmdlineWatcher() as watcher:
        created = cli.finish(cli.popen(*debug, *create_args(
            test_guest, name, console_log, "--flavor-property", "hw:tpm_version=2.0")))
        assert created.rc == 0, created.err
        shown = made.created(json.loads(created.out))
        wait_for_shutoff(libvirt_conn.lookupByUUIDString(shown["uuid"]))
    assert any(b"swtpm" in argv for argv in watcher.seen), "the watcher never saw swtpm"
    outputs = [
        created,
        cli(*debug, "server", "show", name, "-f", "json"),
        cli(*debug, "server", "list", "-f", "json"),
        cli(*debug, "audit", "-f", "json"),
    ]
    passphrase = barbican_passphrase(owner_session, shown["vtpm_secret_uuid"])
    assert len(passphrase) == 512
    outputs.append(cli(*debug, "server", "delete", name))
    password = cli.password("owner")
    for result in outputs:
        assert result.rc == 0, result.err
        text = result.out + result.err
        assert passphrase not in text
        assert password not in text
    assert all(passphrase.encode() not in argv for argv in watcher.seen)
    assert passphrase not in console_log.read_text(errors="replace")


# ----------------------------------------------------------------------------- audit


@pytest.fixture
def plants(libvirt_conn: libvirt.virConnect, cleanup: Cleanup,
           owner_session: ks_session.Session) -> Iterator[Callable[[], dict[str, str]]]:
    """Plant one orphan of each kind; everything planted is removed at teardown."""
    planted: dict[str, str] = {}

    def plant() -> dict[str, str]:
        dir_uuid, secret_instance, barbican_instance = (str(uuid.uuid4()) for _ in range(3))
        state_dir = SWTPM_STATE_ROOT / dir_uuid
        planted["state_dir"] = str(state_dir)
        (state_dir / "tpm2").mkdir(parents=True, mode=0o700)
        planted["state_instance"] = dir_uuid
        secret_uuid = cleanup.secret(str(uuid.uuid4()))
        virt_secret.define_vtpm_secret(libvirt_conn, secret_uuid, secret_instance,
                                       pysecrets.token_urlsafe(32), persistent=False)
        planted["libvirt_secret"] = secret_uuid
        planted["libvirt_instance"] = secret_instance
        resp = owner_session.post(f"{BARBICAN_URL}/v1/secrets", json={
            "name": SECRET_NAME_PREFIX + barbican_instance, "secret_type": "passphrase",
            "payload": pysecrets.token_urlsafe(32), "payload_content_type": "text/plain"})
        planted["barbican_secret"] = resp.json()["secret_ref"].rstrip("/").rsplit("/", 1)[-1]
        planted["barbican_instance"] = barbican_instance
        return dict(planted)

    yield plant
    remove_plants(libvirt_conn, owner_session, planted)


def remove_plants(conn: libvirt.virConnect, session: ks_session.Session,
                  planted: dict[str, str]) -> None:
    if "state_dir" in planted:
        shutil.rmtree(planted["state_dir"], ignore_errors=True)
    if "libvirt_secret" in planted:
        virt_secret.undefine_vtpm_secret(conn, planted["libvirt_secret"])
    if "barbican_secret" in planted:
        session.delete(f"{BARBICAN_URL}/v1/secrets/{planted['barbican_secret']}",
                       raise_exc=False)


ORPHAN_KINDS = ("orphan_libvirt_secrets", "orphan_state_dirs", "orphan_barbican_secrets")


def orphan_ids(report: dict) -> set[tuple[str, str]]:
    """(kind, secret UUID or path) of every orphan in an audit report."""
    return {(kind, o.get("secret_uuid") or o.get("path")) for kind in ORPHAN_KINDS
            for o in report[kind]}


def planted_ids(planted: dict[str, str]) -> set[tuple[str, str]]:
    return {("orphan_state_dirs", planted["state_dir"]),
            ("orphan_libvirt_secrets", planted["libvirt_secret"]),
            ("orphan_barbican_secrets", planted["barbican_secret"])}


def test_audit_finds_planted_orphans_and_then_none(
    cli: CliRunner, plants: Callable[[], dict[str, str]], libvirt_conn: libvirt.virConnect,
    owner_session: ks_session.Session,
) -> None:
    # The stack is shared (other tests create servers at the same time): compare the
    # audit before and after, never assume it is empty.
    before = orphan_ids(cli("audit", "-f", "json").json())
    planted = plants()
    result = cli("audit", "-f", "json")
    report = result.json()
    assert result.err == ""
    assert report["barbican_checked"] is True
    by_instance = {
        kind: {o["instance_uuid"]: o for o in report[kind]} for kind in ORPHAN_KINDS
    }
    state_orphan = by_instance["orphan_state_dirs"][planted["state_instance"]]
    assert state_orphan["path"] == planted["state_dir"]
    libvirt_orphan = by_instance["orphan_libvirt_secrets"][planted["libvirt_instance"]]
    assert libvirt_orphan["secret_uuid"] == planted["libvirt_secret"]
    barbican_orphan = by_instance["orphan_barbican_secrets"][planted["barbican_instance"]]
    assert barbican_orphan["secret_uuid"] == planted["barbican_secret"]
    assert report["clean"] is False
    assert planted_ids(planted) <= orphan_ids(report) - before

    remove_plants(libvirt_conn, owner_session, planted)
    after = orphan_ids(cli("audit", "-f", "json").json())
    assert not planted_ids(planted) & after


def test_audit_repair_removes_planted_orphans_only(
    cli: CliRunner, plants: Callable[[], dict[str, str]], libvirt_conn: libvirt.virConnect,
    owner_session: ks_session.Session,
) -> None:
    planted = plants()
    scope = ["--min-age", "0"] + [arg for key in ("state_instance", "libvirt_instance",
                                                  "barbican_instance")
                                  for arg in ("--instance", planted[key])]
    # --dry-run: the plan names the three, nothing changes.
    plan = cli("audit", "--repair", "--dry-run", *scope, "-f", "json").json()
    assert plan["dry_run"] is True
    assert {(r["action"], r["target"], r["result"]) for r in plan["repair"]} == {
        ("remove_state_dir", planted["state_dir"], "planned"),
        ("undefine_libvirt_secret", planted["libvirt_secret"], "planned"),
        ("delete_barbican_secret", planted["barbican_secret"], "planned"),
    }
    assert Path(planted["state_dir"]).is_dir()
    assert virt_secret.lookup_vtpm_secret(libvirt_conn, planted["libvirt_secret"])
    assert barbican_status(owner_session, planted["barbican_secret"]) == 200

    done = cli("audit", "--repair", *scope, "-f", "json").json()
    assert sorted(r["result"] for r in done["repair"]) == ["done"] * 3
    assert not Path(planted["state_dir"]).exists()
    assert virt_secret.lookup_vtpm_secret(libvirt_conn, planted["libvirt_secret"]) is None
    assert barbican_status(owner_session, planted["barbican_secret"]) == 404
    assert not planted_ids(planted) & orphan_ids(cli("audit", "-f", "json").json())
    # A second repair finds nothing of them left to do.
    again = cli("audit", "--repair", *scope, "-f", "json").json()
    assert again["repair"] == []


def test_audit_without_credentials_lists_libvirt_side_only(cli: CliRunner) -> None:
    result = cli("audit", "-f", "json", cloud=None)
    report = result.json()
    assert report["barbican_checked"] is False and report["orphan_barbican_secrets"] == []
    assert "Barbican not checked" in result.err
