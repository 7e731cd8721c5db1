"""Helpers shared by tools/keymgr/ and tools/aio/.

Both run with their own virtualenv's Python (each has keystoneauth1), against
the one Keystone that tools/keymgr-stack.sh starts. Import it with
``sys.path.insert(0, <tools dir>)``; the helper scripts are not a package.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import yaml
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3

KEYSTONE_URL = "http://127.0.0.1:5000/v3"
REGION = "RegionOne"
DOMAIN = "Default"
DOMAIN_ID = "default"
INTERFACES = ("public", "internal", "admin")


def stack_dir() -> Path:
    """The key-manager stack's state directory (shared with the shell scripts and tests)."""
    return Path(os.environ.get("VTPM_STACK_DIR", "/var/lib/vtpm-driver/stack"))


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (created 0600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_passwords(root: Path, names: Iterable[str]) -> dict[str, str]:
    """Stored passwords of ``names``; missing ones are generated once and saved."""
    path = root / "secrets" / "passwords.json"
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [n for n in names if n not in stored]
    if missing:
        for name in missing:
            stored[name] = secrets.token_urlsafe(24)
        (root / "secrets").mkdir(mode=0o700, exist_ok=True)
        write_private(path, json.dumps(stored, indent=2, sort_keys=True) + "\n")
    return stored


def password_session(username: str, password: str, project: str | None) -> ks_session.Session:
    """A keystoneauth1 session for a Default-domain user (project-scoped if given)."""
    kwargs = {"project_name": project, "project_domain_name": DOMAIN} if project else {}
    auth = v3.Password(auth_url=KEYSTONE_URL, username=username, password=password,
                       user_domain_name=DOMAIN, **kwargs)
    return ks_session.Session(auth=auth)


def cloud_session(clouds_yaml: Path, cloud: str) -> ks_session.Session:
    """A keystoneauth1 session for cloud ``cloud`` of a clouds.yaml we wrote."""
    auth = yaml.safe_load(clouds_yaml.read_text())["clouds"][cloud]["auth"]
    return ks_session.Session(
        auth=v3.Password(
            auth_url=auth["auth_url"],
            username=auth["username"],
            password=auth["password"],
            project_name=auth["project_name"],
            user_domain_name=auth["user_domain_name"],
            project_domain_name=auth["project_domain_name"],
        )
    )


def logs_in(username: str, password: str) -> bool:
    """True when the user can get an (unscoped) token with this password."""
    try:
        password_session(username, password, None).get_token()
    except ks_exc.Unauthorized:
        return False
    return True


class ProvisionError(Exception):
    """Keystone refused or failed a provisioning step."""


class Keystone:
    """Minimal idempotent Keystone v3 admin calls over one session."""

    def __init__(self, sess: ks_session.Session) -> None:
        self.sess = sess

    def call(self, method: str, path: str, **kwargs) -> dict:
        try:
            resp = self.sess.request(KEYSTONE_URL + path, method, **kwargs)
        except ks_exc.HttpError as e:
            raise ProvisionError(f"{method} {path} -> HTTP {e.http_status}: {e.message}") from None
        return resp.json() if resp.content else {}

    def find(self, collection: str, **filters: str) -> dict | None:
        """The single entity of ``collection`` matching ``filters``, or None."""
        found = self.call("GET", f"/{collection}", params=filters)[collection]
        return found[0] if found else None

    def ensure(self, collection: str, body: dict, **filters: str) -> tuple[dict, bool]:
        """Find by ``filters`` or create from ``body``; True when created."""
        existing = self.find(collection, **filters)
        if existing is not None:
            return existing, False
        key = collection[:-1]
        return self.call("POST", f"/{collection}", json={key: body})[key], True

    def grant(self, project_id: str, user_id: str, role_id: str) -> None:
        self.call("PUT", f"/projects/{project_id}/users/{user_id}/roles/{role_id}")

    def set_password(self, user_id: str, password: str) -> None:
        self.call("PATCH", f"/users/{user_id}", json={"user": {"password": password}})

    def ensure_endpoints(self, service: dict, url: str) -> None:
        """One endpoint per interface in ``REGION`` pointing at ``url`` (created or fixed)."""
        stype = service["type"]
        endpoints = self.call("GET", "/endpoints",
                              params={"service_id": service["id"]})["endpoints"]
        for interface in INTERFACES:
            mine = [e for e in endpoints
                    if e["interface"] == interface and e["region_id"] == REGION]
            if not mine:
                body = {"service_id": service["id"], "interface": interface, "url": url,
                        "region_id": REGION}
                self.call("POST", "/endpoints", json={"endpoint": body})
                print(f"  created {interface} {stype} endpoint {url}")
            elif mine[0]["url"] != url:
                self.call("PATCH", f"/endpoints/{mine[0]['id']}", json={"endpoint": {"url": url}})
                print(f"  fixed {interface} {stype} endpoint -> {url}")
