"""Pytest fixtures for the local Keystone + Barbican stack.

The stack is started by ``tools/keymgr-stack.sh start`` (``.ci/run`` does it in
CI); these fixtures only find it. Without it the tests skip, except under
``CI=true`` where they fail: a missing service must never pass as a skip.
Set ``VTPM_STACK_AUTOSTART=1`` to let the fixture run ``start`` itself.

``AccessLogCounter`` counts the HTTP requests each service received, from the
gunicorn access logs, so tests can assert how many Keystone/Barbican calls an
operation costs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import yaml
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3

from bench import services
from tests.functional.support import run_tool_script, unavailable

STACK_DIR = Path(os.environ.get("VTPM_STACK_DIR", "/var/lib/vtpm-driver/stack"))
KEYSTONE_URL = "http://127.0.0.1:5000/v3"
BARBICAN_URL = "http://127.0.0.1:9311"
STACK_SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "keymgr-stack.sh"
CLOUD_NAMES = ("owner", "member", "other", "admin", "service")

_AUTH_KEYS = (
    "auth_url",
    "username",
    "password",
    "project_name",
    "user_domain_name",
    "project_domain_name",
)


@dataclasses.dataclass(frozen=True)
class KeymgrStack:
    """Where the running stack lives."""

    stack_dir: Path
    keystone_url: str = KEYSTONE_URL
    barbican_url: str = BARBICAN_URL

    @property
    def clouds_file(self) -> Path:
        return self.stack_dir / "clouds.yaml"

    def access_log(self, service: str) -> Path:
        return self.stack_dir / "logs" / f"{service}-access.log"


def _run_stack_script(action: str, timeout: float) -> tuple[int, str]:
    return run_tool_script(STACK_SCRIPT, action, timeout, {"VTPM_STACK_DIR": str(STACK_DIR)})


@pytest.fixture(scope="session")
def keymgr_stack() -> KeymgrStack:
    """The running Keystone + Barbican stack (skip, or fail under CI=true, if absent)."""
    rc, out = _run_stack_script("status", timeout=60)
    if rc != 0 and os.environ.get("VTPM_STACK_AUTOSTART") == "1":
        rc, out = _run_stack_script("start", timeout=600)
    if rc != 0:
        msg = (
            f"Keystone/Barbican stack not usable (run 'tools/keymgr-stack.sh start'; "
            f"VTPM_STACK_DIR={STACK_DIR}):\n{out}"
        )
        unavailable(msg)
    return KeymgrStack(stack_dir=STACK_DIR)


@pytest.fixture(scope="session")
def clouds(keymgr_stack: KeymgrStack) -> dict[str, dict[str, str]]:
    """Cloud name -> flat credentials from clouds.yaml.

    Keys: auth_url, username, password, project_name, user_domain_name,
    project_domain_name, region_name, interface.
    """
    data = yaml.safe_load(keymgr_stack.clouds_file.read_text())["clouds"]
    result = {}
    for name, cloud in data.items():
        creds = {k: str(cloud["auth"][k]) for k in _AUTH_KEYS}
        creds["region_name"] = cloud.get("region_name", "RegionOne")
        creds["interface"] = cloud.get("interface", "public")
        result[name] = creds
    missing = set(CLOUD_NAMES) - set(result)
    if missing:
        pytest.fail(f"clouds.yaml lacks {sorted(missing)}: run tools/keymgr-stack.sh provision")
    return result


def password_auth(creds: dict[str, str], project_name: str | None = None) -> v3.Password:
    """A keystoneauth1 v3 password plugin for one cloud's credentials."""
    return v3.Password(
        auth_url=creds["auth_url"],
        username=creds["username"],
        password=creds["password"],
        user_domain_name=creds["user_domain_name"],
        project_name=project_name or creds["project_name"],
        project_domain_name=creds["project_domain_name"],
    )


@pytest.fixture(scope="session")
def keystone_session(
    clouds: dict[str, dict[str, str]],
) -> Callable[..., ks_session.Session]:
    """Factory: ``keystone_session(name, project_name=None)`` -> new Session.

    Each call returns a fresh session (its own token, fetched on first use).
    ``project_name`` scopes to another project the user has a role on, e.g.
    ``keystone_session("admin", project_name="vtpm-a")``.
    """

    def make(name: str, project_name: str | None = None) -> ks_session.Session:
        if name not in clouds:
            raise LookupError(f"unknown cloud {name!r}; known: {sorted(clouds)}")
        return ks_session.Session(auth=password_auth(clouds[name], project_name))

    return make


# --- request counting ------------------------------------------------------------------

# gunicorn --access-logformat '%(h)s %(t)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'
# (tools/keymgr-stack.sh)
_LINE_RE = re.compile(r'^(?P<host>\S+) .*?"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" '
                      r'(?P<status>\d{3}) (?:.*"(?P<agent>[^"]*)"\s*$)?')
_SYNC_PARAM = "vtpm-log-sync"
_SYNC_URLS = {"keystone": KEYSTONE_URL, "barbican": BARBICAN_URL + "/"}
_SERVER_SIDE_AGENTS = ("keystonemiddleware", "python-keystoneclient")


@dataclasses.dataclass(frozen=True)
class AccessLogEntry:
    """One request as the service's access log recorded it."""

    service: str
    method: str
    path: str
    status: int


class AccessLogCounter:
    """Counts the requests Keystone and Barbican received since :meth:`mark`.

    Reading first sends each service one unauthenticated marker request and
    waits until the log shows it, so every request answered before the call
    is in the log (gunicorn writes the line just after the response). Marker
    requests are never counted, by this or any other counter.

    With ``source`` (a loopback address this process's connections come from,
    see :func:`bench.services.pinned_source_address`) only this process's
    requests count, plus the token checks Barbican's keystonemiddleware sends
    to Keystone: other test runs sharing the stack no longer change the counts.
    """

    SERVICES = ("keystone", "barbican")

    def __init__(self, stack_dir: Path = STACK_DIR, sync_timeout: float = 10.0,
                 source: str | None = None) -> None:
        self._logs = {s: stack_dir / "logs" / f"{s}-access.log" for s in self.SERVICES}
        self._sync_timeout = sync_timeout
        self.source = source
        self._offsets: dict[str, int] = {}
        self.mark()

    def mark(self) -> None:
        """Start counting from now (remember the end of both logs)."""
        self._offsets = {s: self._size(s) for s in self.SERVICES}

    def _size(self, service: str) -> int:
        try:
            return self._logs[service].stat().st_size
        except FileNotFoundError:
            return 0

    def _read_new(self, service: str) -> str:
        offset = self._offsets[service]
        if self._size(service) < offset:  # log truncated or replaced: start over
            offset = 0
        with open(self._logs[service], "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def _sync(self, service: str) -> None:
        token = uuid.uuid4().hex
        try:
            requests.get(_SYNC_URLS[service], params={_SYNC_PARAM: token}, timeout=10)
        except requests.RequestException as e:
            raise AssertionError(f"{service} does not answer: {e}") from None
        deadline = time.monotonic() + self._sync_timeout
        while token not in self._read_new(service):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self._logs[service]} never showed the marker request: "
                    "is gunicorn's --access-logfile on?"
                )
            time.sleep(0.02)

    def entries(self, service: str) -> list[AccessLogEntry]:
        """Requests ``service`` ('keystone' or 'barbican') logged since mark()."""
        if service not in self._logs:
            raise LookupError(f"unknown service {service!r}; known: {self.SERVICES}")
        self._sync(service)
        found = []
        for line in self._read_new(service).splitlines():
            m = _LINE_RE.search(line)
            if m is None or _SYNC_PARAM + "=" in m["path"]:
                continue
            if (self.source and m["host"] != self.source
                    and not any(a in (m["agent"] or "") for a in _SERVER_SIDE_AGENTS)):
                continue
            found.append(AccessLogEntry(service, m["method"], m["path"], int(m["status"])))
        return found

    def count(self, service: str, method: str | None = None, path: str | None = None) -> int:
        """Requests since mark(), optionally only one HTTP method / path substring."""
        return sum(
            1
            for e in self.entries(service)
            if (method is None or e.method == method.upper()) and (path is None or path in e.path)
        )

    def keystone(self, method: str | None = None, path: str | None = None) -> int:
        return self.count("keystone", method, path)

    def barbican(self, method: str | None = None, path: str | None = None) -> int:
        return self.count("barbican", method, path)


def own_source_address() -> str:
    """A loopback address of this test process's own (127.66.x.y from its pid)."""
    pid = os.getpid()
    return f"127.66.{(pid >> 8) % 254 + 1}.{pid % 254 + 1}"


@pytest.fixture
def access_log_counter(keymgr_stack: KeymgrStack) -> Iterator[AccessLogCounter]:
    """An AccessLogCounter marked at the start of the test, counting only this process.

    For the test's duration every connection to a loopback service leaves
    from :func:`own_source_address` (how the benchmark attributes requests).
    """
    addr = own_source_address()
    with services.pinned_source_address(addr):
        yield AccessLogCounter(keymgr_stack.stack_dir, source=addr)
