"""Register the all-in-one cloud's services in the keymgr stack's Keystone.

Run by ``tools/openstack-aio.sh`` (AIO virtualenv) once Keystone answers.
Idempotent: what exists is kept, what is missing is created, role grants are
PUTs, an endpoint with the wrong URL is fixed, a service user whose stored
password no longer logs in gets it set again. Uses the stack's ``admin``
cloud (vtpm-admin, admin of project admin); never deletes anything.
"""

from __future__ import annotations

import sys

from keystoneauth1 import exceptions as ks_exc
from render import ENDPOINTS, aio_dir, load_passwords, stack_dir
from stacklib import DOMAIN_ID, Keystone, ProvisionError, cloud_session, logs_in

# service user -> roles in project "service". Nova's user talks to Placement
# (admin API) and to Neutron/Glance on behalf of users.
USERS = {
    "nova": ("admin", "service"),
    "placement": ("service",),
    "glance": ("service",),
}

# The keymgr stack's server owner (user, project): gets role "manager" in its project.
OWNER = ("vtpm-owner", "vtpm-a")


def provision(passwords: dict[str, str]) -> None:
    ks = Keystone(cloud_session(stack_dir() / "clouds.yaml", "admin"))
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
        user, created = ks.ensure("users", body, name=name, domain_id=DOMAIN_ID)
        if created:
            print(f"  created user {name}")
        elif not logs_in(name, passwords[name]):
            print(f"  reset the password of user {name} to the stored one")
            ks.set_password(user["id"], passwords[name])
        for role in role_names:
            ks.grant(project["id"], user["id"], roles[role]["id"])

    # The servers' owner may move its own servers: Nova's default policy lets a project
    # manager (or an admin) cold- and live-migrate (without choosing the host), and
    # only the owner may read a 'user' or 'host' mode vTPM secret (owner-only ACL),
    # which the destination of a cold migration needs.
    owner = ks.find("users", name=OWNER[0], domain_id=DOMAIN_ID)
    owner_project = ks.find("projects", name=OWNER[1], domain_id=DOMAIN_ID)
    manager = ks.find("roles", name="manager")
    if owner is None or owner_project is None or manager is None:
        raise ProvisionError(
            f"user {OWNER[0]}, project {OWNER[1]} or role manager is missing: "
            "run tools/keymgr-stack.sh provision")
    ks.grant(owner_project["id"], owner["id"], manager["id"])

    for stype, (sname, url) in ENDPOINTS.items():
        service, created = ks.ensure("services", {"name": sname, "type": stype}, type=stype)
        if created:
            print(f"  created service {sname} ({stype})")
        ks.ensure_endpoints(service, url)


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
