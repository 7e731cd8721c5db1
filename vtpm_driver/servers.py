"""Standalone servers: build an :class:`~vtpm_driver.objects.Instance`, find it again.

libvirt is the only store: each server's record (owner, flavor extra specs,
image properties, system metadata, boot files) lives in its domain's
``<metadata>`` (:class:`~vtpm_driver.virt.domain.ServerRecord`). This module
converts between that record and the Nova-shaped ``Instance`` the driver works
on, so ``server list``/``show`` work after a restart with no database.

The domain's name is ``instance.name`` and its UUID ``instance.uuid``.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import libvirt

from vtpm_driver import context as vtpm_context
from vtpm_driver import exception, objects, spec
from vtpm_driver.virt import domain, guest


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
                f"invalid {what} entry {spec.show(key)}={spec.show(item)}: keys and values "
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
) -> objects.Instance:
    """A new server owned by the caller of ``context`` (nothing is created yet).

    The vTPM request is validated now (SPEC A6), so a bad flavor or image is
    refused before the driver is even called. Boot files and sizes are
    checked by the driver's spawn, still before anything is created.

    :raises InvalidVTPMConfig: bad or conflicting vTPM properties.
    """
    extra_specs = _str_dict(flavor_extra_specs, "flavor extra specs")
    properties = _str_dict(image_properties, "image properties")
    spec.get_vtpm_config(extra_specs, properties)
    return objects.Instance(
        name=name,
        user_id=context.user_id,
        project_id=context.project_id,
        user_name=context.user_name,
        project_name=context.project_name,
        flavor=objects.Flavor(vcpus=vcpus, memory_mb=memory_mb, extra_specs=extra_specs),
        image_meta=objects.ImageMeta(
            properties=properties, kernel=kernel, initrd=initrd, cmdline=cmdline, disk=disk
        ),
        console_log=console_log,
        created_at=now_iso(),
    )


def _properties(image_meta: Any) -> dict[str, str]:
    props = getattr(image_meta, "properties", None)
    return dict(props) if isinstance(props, Mapping) else {}


def to_record(instance: objects.Instance) -> domain.ServerRecord:
    """The record stored in the domain's ``<metadata>`` (no secret, only UUIDs)."""
    flavor = instance.flavor
    image = instance.image_meta
    return domain.ServerRecord(
        name=instance.name,
        uuid=instance.uuid,
        user_id=instance.user_id,
        project_id=instance.project_id,
        user_name=getattr(instance, "user_name", None),
        project_name=getattr(instance, "project_name", None),
        flavor_extra_specs=dict(getattr(flavor, "extra_specs", None) or {}),
        image_properties=_properties(image),
        system_metadata=dict(instance.system_metadata),
        vcpus=flavor.vcpus,
        memory_mb=flavor.memory_mb,
        kernel=getattr(image, "kernel", None),
        initrd=getattr(image, "initrd", None),
        cmdline=getattr(image, "cmdline", None),
        disk=getattr(image, "disk", None),
        console_log=instance.console_log,
        created_at=getattr(instance, "created_at", None),
    )


def from_record(record: domain.ServerRecord) -> objects.Instance:
    """The ``Instance`` a stored record describes."""
    return objects.Instance(
        name=record.name,
        uuid=record.uuid,
        user_id=record.user_id,
        project_id=record.project_id,
        user_name=record.user_name,
        project_name=record.project_name,
        flavor=objects.Flavor(
            vcpus=record.vcpus, memory_mb=record.memory_mb,
            extra_specs=dict(record.flavor_extra_specs),
        ),
        image_meta=objects.ImageMeta(
            properties=dict(record.image_properties), kernel=record.kernel,
            initrd=record.initrd, cmdline=record.cmdline, disk=record.disk,
        ),
        system_metadata=dict(record.system_metadata),
        console_log=record.console_log,
        created_at=record.created_at,
    )


def find(conn: libvirt.virConnect, name_or_uuid: str) -> objects.Instance:
    """The server whose domain has this UUID or name.

    :raises InstanceNotFound: no such domain, or the domain is not one of ours
        (it carries no server record).
    """
    dom = guest.lookup(conn, name_or_uuid)
    record = domain.record_from_domain(dom)
    if record is None:
        raise exception.InstanceNotFound(
            f"domain {spec.show(name_or_uuid)} exists but is not a vtpm-driver server "
            "(it has no server record in its <metadata>)"
        )
    return from_record(record)


def list_all(conn: libvirt.virConnect) -> list[objects.Instance]:
    """Every server on this host, sorted by name (domains without a record are skipped)."""
    return [from_record(record) for _dom, record in guest.list_domains_with_record(conn)]
