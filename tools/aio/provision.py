"""Register the all-in-one cloud's services in the keymgr stack's Keystone.

Run by ``tools/openstack-aio.sh`` (AIO virtualenv) once Keystone answers.
Idempotent: what exists is kept, what is missing is created, role grants are
PUTs, an endpoint with the wrong URL is fixed, a service user whose stored
password no longer logs in gets it set again. Uses the stack's ``admin``
cloud (vtpm-admin, admin of project admin); never deletes anything.
"""

from __future__ import annotations

import sys

import yaml
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from render import (
    ENDPOINTS,
    KEYSTONE_URL,
    REGION,
    aio_dir,
    load_passwords,
    stack_dir,
)

DOMAIN_ID = "default"
INTERFACES = ("public", "internal", "admin")
# service user -> roles in project "service". Nova's user talks to Placement
# (admin API) and to Neutron/Glance on behalf of users.
USERS = {
    "nova": ("admin", "service"),
    "placement": ("service",),
    "glance": ("service",),
}


class ProvisionError(Exception):
    """Keystone refused or failed a provisioning step."""


def admin_session() -> ks_session.Session:
    cloud = yaml.safe_load((stack_dir() / "clouds.yaml").read_text())["clouds"]["admin"]
    auth = cloud["auth"]
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
        found = self.call("GET", f"/{collection}", params=filters)[collection]
        return found[0] if found else None

    def ensure(self, collection: str, body: dict, **filters: str) -> dict:
        existing = self.find(collection, **filters)
        if existing is not None:
            return existing
        key = collection[:-1]
        created = self.call("POST", f"/{collection}", json={key: body})[key]
        print(f"  created {key} {body.get('name', '')}".rstrip())
        return created


def logs_in(username: str, password: str) -> bool:
    auth = v3.Password(
        auth_url=KEYSTONE_URL, username=username, password=password, user_domain_id=DOMAIN_ID
    )
    try:
        ks_session.Session(auth=auth).get_token()
    except ks_exc.Unauthorized:
        return False
    return True


def provision(passwords: dict[str, str]) -> None:
    ks = Keystone(admin_session())
    project = ks.find("projects", name="service", domain_id=DOMAIN_ID)
    if project is None:
        raise ProvisionError("project 'service' is missing: run tools/keymgr-stack.sh provision")
    roles = {}
    for name in {r for rs in USERS.values() for r in rs}:
        role = ks.find("roles", name=name)
        if role is None:
            raise ProvisionError(f"role {name!r} is missing: run tools/keymgr-stack.sh provision")
        roles[name] = role

    for name, role_names in USERS.items():
        body = {
            "name": name,
            "domain_id": DOMAIN_ID,
            "password": passwords[name],
            "default_project_id": project["id"],
            "enabled": True,
        }
        user = ks.ensure("users", body, name=name, domain_id=DOMAIN_ID)
        if not logs_in(name, passwords[name]):
            print(f"  reset the password of user {name} to the stored one")
            ks.call("PATCH", f"/users/{user['id']}", json={"user": {"password": passwords[name]}})
        for role in role_names:
            grant = f"/projects/{project['id']}/users/{user['id']}/roles/{roles[role]['id']}"
            ks.call("PUT", grant)

    for stype, (sname, url) in ENDPOINTS.items():
        service = ks.ensure("services", {"name": sname, "type": stype}, type=stype)
        endpoints = ks.call("GET", "/endpoints", params={"service_id": service["id"]})["endpoints"]
        for interface in INTERFACES:
            mine = [
                e for e in endpoints if e["interface"] == interface and e["region_id"] == REGION
            ]
            if not mine:
                body = {
                    "service_id": service["id"],
                    "interface": interface,
                    "url": url,
                    "region_id": REGION,
                }
                ks.call("POST", "/endpoints", json={"endpoint": body})
                print(f"  created {interface} {stype} endpoint {url}")
            elif mine[0]["url"] != url:
                ks.call("PATCH", f"/endpoints/{mine[0]['id']}", json={"endpoint": {"url": url}})
                print(f"  fixed {interface} {stype} endpoint -> {url}")


def main(argv: list[str]) -> int:
    if argv:
        print("usage: provision.py", file=sys.stderr)
        return 2
    try:
        provision(load_passwords(aio_dir()))
    except (ProvisionError, ks_exc.ClientException, OSError, KeyError) as e:
        print(f"[openstack-aio] ERROR: provisioning Keystone failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
