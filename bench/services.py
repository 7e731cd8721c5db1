"""Finding the local Keystone + Barbican stack and counting the requests it receives.

Counting uses the gunicorn access logs (one line per request, written by
``tools/keymgr-stack.sh``). Other processes may use the same stack while the
benchmark runs (test suites, other developers), so the benchmark pins the
source address of its own HTTP connections to a loopback address of its own
(``127.0.0.88`` by default, env ``VTPM_BENCH_SOURCE_ADDR``): the access log's
``%(h)s`` field then tells our requests from everyone else's. Requests
Barbican itself sends to Keystone (token validation by keystonemiddleware)
come from Barbican's address and are counted separately, by user agent; those
cannot be attributed to one client and are exact only on an otherwise idle stack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import requests
import urllib3.connection
import yaml

STACK_DIR = Path(os.environ.get("VTPM_STACK_DIR", "/var/lib/vtpm-driver/stack"))
KEYSTONE_URL = "http://127.0.0.1:5000/v3"
BARBICAN_URL = "http://127.0.0.1:9311"
DEFAULT_SOURCE_ADDR = "127.0.0.88"
SERVICES = ("keystone", "barbican")

_AUTH_KEYS = ("auth_url", "username", "password", "project_name", "user_domain_name",
              "project_domain_name")
# gunicorn --access-logformat '%(h)s %(t)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'
_LINE_RE = re.compile(
    r'^(?P<host>\S+) \[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" '
    r'(?P<status>\d{3}) \S+ \S+ "(?P<agent>[^"]*)"'
)
_SYNC_PARAM = "vtpm-bench-sync"
_SYNC_URLS = {"keystone": KEYSTONE_URL, "barbican": BARBICAN_URL + "/"}
_SERVER_SIDE_AGENTS = ("keystonemiddleware", "python-keystoneclient")


class StackUnavailable(RuntimeError):
    """Keystone/Barbican (or their credentials or logs) cannot be used."""


def load_clouds(stack_dir: Path = STACK_DIR) -> dict[str, dict[str, str]]:
    """Cloud name -> flat keystoneauth1 password credentials from ``clouds.yaml``."""
    path = stack_dir / "clouds.yaml"
    try:
        data = yaml.safe_load(path.read_text())["clouds"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise StackUnavailable(
            f"cannot read {path} ({type(exc).__name__}): run tools/keymgr-stack.sh start"
        ) from None
    return {name: {k: str(cloud["auth"][k]) for k in _AUTH_KEYS} for name, cloud in data.items()}


def check_stack(stack_dir: Path = STACK_DIR) -> None:
    """Raise StackUnavailable unless both services answer and both access logs exist."""
    for service, url in _SYNC_URLS.items():
        try:
            requests.get(url, timeout=5)
        except requests.RequestException as exc:
            raise StackUnavailable(
                f"{service} at {url} does not answer ({type(exc).__name__}): "
                "run tools/keymgr-stack.sh start"
            ) from None
        log = access_log(stack_dir, service)
        if not log.is_file():
            raise StackUnavailable(f"{log} is missing: the stack runs without access logs")


def access_log(stack_dir: Path, service: str) -> Path:
    return stack_dir / "logs" / f"{service}-access.log"


# --- our own source address ---------------------------------------------------------------

def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def source_addr_usable(addr: str) -> bool:
    """True if a socket can bind ``addr`` (every 127/8 address can on Linux)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((addr, 0))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def pinned_source_address(addr: str) -> Iterator[None]:
    """Make every urllib3 connection to a loopback host originate from ``addr``.

    requests, keystoneauth1, python-barbicanclient and castellan all connect
    through urllib3, so this marks all of this process's traffic to the stack.
    """
    original = urllib3.connection.HTTPConnection.__init__

    def init(self, host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("source_address") is None and _is_loopback(str(host)):
            kwargs["source_address"] = (addr, 0)
        original(self, host, *args, **kwargs)

    urllib3.connection.HTTPConnection.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        urllib3.connection.HTTPConnection.__init__ = original  # type: ignore[method-assign]


# --- counting -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LogEntry:
    """One request line of an access log."""

    service: str
    host: str
    method: str
    path: str
    status: int
    agent: str


def parse_line(service: str, line: str) -> LogEntry | None:
    """A parsed access-log line, or None for a line of another shape."""
    m = _LINE_RE.match(line)
    if m is None:
        return None
    return LogEntry(service, m["host"], m["method"], m["path"], int(m["status"]), m["agent"])


@dataclasses.dataclass
class RequestCounts:
    """Requests seen in one counting window."""

    keystone: int = 0  # sent by us to Keystone
    barbican: int = 0  # sent by us to Barbican
    keystone_by_barbican: int = 0  # token checks Barbican sent to Keystone (server side)
    foreign: int = 0  # other clients' requests in the window (a busy, shared stack)
    by_request: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: int = 0  # our requests answered with 4xx/5xx

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class AccessLogCounter:
    """Counts requests since :meth:`mark` from both access logs.

    :meth:`read` first sends each service an unauthenticated marker request
    and waits for its line, so every request answered before the call is in
    the log (gunicorn writes the line after the response). Markers are not counted.
    """

    def __init__(self, stack_dir: Path = STACK_DIR, source_addr: str | None = None,
                 sync_timeout: float = 10.0) -> None:
        self._logs = {s: access_log(stack_dir, s) for s in SERVICES}
        self._source = source_addr
        self._sync_timeout = sync_timeout
        self._offsets = dict.fromkeys(SERVICES, 0)
        self.mark()

    def mark(self) -> None:
        # Sync first so requests still being logged from earlier work fall before the mark.
        for service in SERVICES:
            self._sync(service, from_offsets=False)
        self._offsets = {s: self._size(s) for s in SERVICES}

    def _size(self, service: str) -> int:
        try:
            return self._logs[service].stat().st_size
        except FileNotFoundError:
            return 0

    def _read_new(self, service: str, offset: int) -> str:
        if self._size(service) < offset:  # log rotated or truncated
            offset = 0
        with open(self._logs[service], "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def _sync(self, service: str, *, from_offsets: bool = True) -> int:
        """Send a marker request, wait for its log line; return the log size then."""
        offset = self._offsets[service] if from_offsets else self._size(service)
        token = uuid.uuid4().hex
        try:
            requests.get(_SYNC_URLS[service], params={_SYNC_PARAM: token}, timeout=10)
        except requests.RequestException as exc:
            raise StackUnavailable(f"{service} stopped answering: {type(exc).__name__}") from None
        deadline = time.monotonic() + self._sync_timeout
        while True:
            if token in self._read_new(service, offset):
                return self._size(service)
            if time.monotonic() > deadline:
                raise StackUnavailable(f"{self._logs[service]} never showed the marker request")
            time.sleep(0.005)

    def entries(self, advance: bool = False) -> list[LogEntry]:
        """Requests logged since the mark; ``advance`` makes this the next window's start."""
        found = []
        ends = {}
        for service in SERVICES:
            ends[service] = self._sync(service)
            text = self._read_new(service, self._offsets[service])
            for line in text.splitlines():
                entry = parse_line(service, line)
                if entry is not None and _SYNC_PARAM + "=" not in entry.path:
                    found.append(entry)
        if advance:
            self._offsets = ends
        return found

    def read(self, advance: bool = False) -> RequestCounts:
        """Counts since the last :meth:`mark` (or the last ``read(advance=True)``).

        ``advance=True`` starts the next window right after this one, which
        saves a second marker round trip when windows follow each other.
        """
        counts = RequestCounts()
        for e in self.entries(advance):
            ours = self._source is None or e.host == self._source
            if ours:
                setattr(counts, e.service, getattr(counts, e.service) + 1)
                key = f"{e.service} {e.method} {_path_shape(e.path)}"
                counts.by_request[key] = counts.by_request.get(key, 0) + 1
                if e.status >= 400:
                    counts.errors += 1
            elif e.service == "keystone" and any(a in e.agent for a in _SERVER_SIDE_AGENTS):
                counts.keystone_by_barbican += 1
            else:
                counts.foreign += 1
        return counts

    @staticmethod
    def add(total: RequestCounts, more: RequestCounts) -> None:
        """Accumulate ``more`` into ``total``."""
        for field in ("keystone", "barbican", "keystone_by_barbican", "foreign", "errors"):
            setattr(total, field, getattr(total, field) + getattr(more, field))
        for key, n in more.by_request.items():
            total.by_request[key] = total.by_request.get(key, 0) + n


_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")


def _path_shape(path: str) -> str:
    """``/v1/secrets/<uuid>/payload`` -> ``/v1/secrets/{id}/payload``; query dropped."""
    return _UUID_RE.sub("{id}", path.split("?", 1)[0])
