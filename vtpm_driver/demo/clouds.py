"""The demo's second user: password credentials of one cloud of a ``clouds.yaml``.

The demo shows that another member of the owner's project cannot unlock the
server; that member's credentials come from the clouds.yaml
``tools/keymgr-stack.sh`` writes (cloud ``member``).
"""

from __future__ import annotations

from collections.abc import Mapping

import yaml

from vtpm_driver import exception


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


