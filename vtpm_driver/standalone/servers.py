"""Standalone servers: build an :class:`~vtpm_driver.model.server.Instance`, find it again.

libvirt is the only store: each server (owner, flavor extra specs, image
properties, system metadata, boot files) is serialised into its domain's
``<metadata>`` by :mod:`vtpm_driver.virt.record`, so ``server list``/``show``
work after a restart with no database. This module validates a new server's
request and finds stored ones through :mod:`vtpm_driver.virt.domains`.

The domain's name is ``instance.name`` and its UUID ``instance.uuid``.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from vtpm_driver import exception
from vtpm_driver.keymgr import context as vtpm_context
from vtpm_driver.model import request
from vtpm_driver.model.request import UNPARSED, Unparsed, VTPMConfig
from vtpm_driver.model.server import Flavor, ImageMeta, Instance
from vtpm_driver.virt import domains


def _str_dict(value: Mapping[str, str] | None, what: str) -> dict[str, str]:
    """A plain ``dict[str, str]`` copy, or a typed error naming the bad entry."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise exception.InvalidVTPMConfig(
            f"{what} must be a mapping of strings, got {type(value).__name__}"
        )
    result = {}
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise exception.InvalidVTPMConfig(
                f"invalid {what} entry {request.show(key)}={request.show(item)}: keys and values "
                "must be strings"
            )
        result[key] = item
    return result


def now_iso() -> str:
    """Current UTC time, ISO 8601 with seconds (what ``created_at`` holds)."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


def new_instance(
    name: str,
    context: vtpm_context.RequestContext,
    *,
    flavor_extra_specs: Mapping[str, str] | None = None,
    image_properties: Mapping[str, str] | None = None,
    kernel: str | None = None,
    initrd: str | None = None,
    cmdline: str | None = None,
    disk: str | None = None,
    vcpus: int = 1,
    memory_mb: int = 256,
    console_log: str | None = None,
    vtpm: VTPMConfig | Unparsed | None = UNPARSED,
) -> Instance:
    """A new server owned by the caller of ``context`` (nothing is created yet).

    The vTPM request is validated now (SPEC A6), so a bad flavor or image is
    refused before the driver is even called. Boot files and sizes are
    checked by the driver's spawn, still before anything is created. ``vtpm``:
    the request as the caller already parsed it from these same properties
    (:data:`~vtpm_driver.model.request.UNPARSED`: parse it here).

    :raises InvalidVTPMConfig: bad or conflicting vTPM properties.
    """
    extra_specs = _str_dict(flavor_extra_specs, "flavor extra specs")
    properties = _str_dict(image_properties, "image properties")
    if vtpm is UNPARSED:
        request.get_vtpm_config(extra_specs, properties)
    return Instance(
        name=name,
        user_id=context.user_id,
        project_id=context.project_id,
        user_name=context.user_name,
        project_name=context.project_name,
        flavor=Flavor(vcpus=vcpus, memory_mb=memory_mb, extra_specs=extra_specs),
        image_meta=ImageMeta(
            properties=properties, kernel=kernel, initrd=initrd, cmdline=cmdline, disk=disk
        ),
        console_log=console_log,
        created_at=now_iso(),
    )


def find(conn: Any, name_or_uuid: str) -> Instance:
    """The server whose domain has this UUID or name (``conn``: a libvirt connection).

    :raises InstanceNotFound: no such domain, or the domain is not one of ours.
    """
    return domains.find_server(conn, name_or_uuid)


def list_all(conn: Any) -> list[Instance]:
    """Every server on this host, sorted by name (domains without a record are skipped)."""
    return [server for _dom, server in domains.list_servers(conn)]
