"""THE server model: Instance / Flavor / ImageMeta with Nova's attribute names.

The driver only reads the attributes Nova's objects have, so a real Nova
``Instance`` can be passed in place of these (duck typing); the standalone CLI
builds these dataclasses. The readers below (:func:`flavor_extra_specs`,
:func:`image_properties`, :func:`recorded_secret`, :func:`is_rescued`, ...)
take either, and the ``system_metadata`` keys (:data:`SYSMETA_KEY`,
:data:`RESCUE_KEY`) are Nova's names, defined once here. The standalone server record in a domain's
``<metadata>`` is this model serialised (:mod:`vtpm_driver.virt.record`), and
the operator audit works on it too (:mod:`vtpm_driver.audit`).

UUIDs are checked with oslo.utils (:func:`canonical_uuid`,
:func:`require_uuid`), once for every module that builds paths, XML or
comparisons from them.
"""

from __future__ import annotations

import dataclasses
import uuid as uuid_mod
from collections.abc import Mapping
from typing import Any

from oslo_utils import uuidutils

from vtpm_driver import exception
from vtpm_driver.model import request
from vtpm_driver.model.request import show

#: ``system_metadata`` key holding the Barbican secret UUID (Nova's name).
SYSMETA_KEY = "vtpm_secret_uuid"
#: The EK certificate of a TPM the driver manufactured with the deployment's CA
#: (:mod:`vtpm_driver.virt.manufacture`): the Barbican secret the owner reads it from,
#: its sha256 fingerprint and (standalone, where the record has room) its PEM.
EK_CERT_KEY = "vtpm_ek_certificate_uuid"
EK_FINGERPRINT_KEY = "vtpm_ek_fingerprint"
EK_PEM_KEY = "vtpm_ek_certificate"
#: ``system_metadata`` key of a server booted in rescue mode.
RESCUE_KEY = "vtpm_rescued"


def canonical_uuid(value: object) -> str | None:
    """``value`` as libvirt and Nova write a UUID (lowercase, dashed), or None.

    Anything oslo.utils' ``is_uuid_like`` accepts (upper case, no dashes,
    braces) is a UUID; everything else, including non-strings, is None.
    """
    if not isinstance(value, str) or not uuidutils.is_uuid_like(value):
        return None
    return str(uuid_mod.UUID(value))


def require_uuid(value: object, what: str,
                 error: type[exception.VTPMError] = exception.VirtError) -> str:
    """:func:`canonical_uuid` of ``value``, or ``error`` naming ``what``.

    Everything built from a UUID (XML, paths under the swtpm state dir, backup
    directories) goes through here, so a hostile value never reaches a path or
    a document.

    :raises VTPMError: (``error``) ``value`` is not a UUID.
    """
    found = canonical_uuid(value)
    if found is None:
        raise error(f"invalid {what}={show(value)}: expected a UUID")
    return found


@dataclasses.dataclass
class Flavor:
    """What Nova's Flavor carries that a vTPM guest needs."""

    name: str = "standalone"
    vcpus: int = 1
    memory_mb: int = 256
    extra_specs: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ImageMeta:
    """Image properties (``hw_tpm_version`` ...) plus, standalone, the boot files."""

    properties: dict[str, str] = dataclasses.field(default_factory=dict)
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    disk: str | None = None


@dataclasses.dataclass
class Instance:
    """A server: who owns it, what it asks for, and Nova's system metadata."""

    name: str
    user_id: str
    project_id: str
    flavor: Flavor = dataclasses.field(default_factory=Flavor)
    image_meta: ImageMeta = dataclasses.field(default_factory=ImageMeta)
    uuid: str = dataclasses.field(default_factory=uuidutils.generate_uuid)
    system_metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    console_log: str | None = None
    # Display names and creation time, kept in the standalone server record.
    user_name: str | None = None
    project_name: str | None = None
    created_at: str | None = None
    # Nova's resize bookkeeping: set by the caller (Nova's compute manager, or a
    # test standing in for it) around migrate_disk_and_power_off/finish_migration.
    # Not part of the stored record.
    old_flavor: Flavor | None = None
    new_flavor: Flavor | None = None

    @property
    def vtpm_secret_uuid(self) -> str | None:
        return self.system_metadata.get(SYSMETA_KEY)


# -- readers: a server's (ours or Nova's) flavor, image and system_metadata ------------


def flavor_extra_specs(flavor: Any) -> Mapping[str, Any]:
    """A flavor's (object or dict) extra specs; empty when it has none."""
    if flavor is None:
        return {}
    if isinstance(flavor, Mapping):
        found = flavor.get("extra_specs")
    else:
        found = getattr(flavor, "extra_specs", None)
    return found if isinstance(found, Mapping) else {}


def image_properties(image_meta: Any) -> Mapping[str, Any]:
    """The vTPM image properties of an image (object, dict, or Nova ``ImageMetaProps``).

    Nova's ``ImageMetaProps`` is not a ``Mapping`` but has ``get``; only the
    keys :mod:`vtpm_driver.model.request` reads are copied, and only when set.
    """
    if image_meta is None:
        return {}
    if isinstance(image_meta, Mapping):
        props: Any = image_meta.get("properties")
    else:
        props = getattr(image_meta, "properties", None)
    if props is None:
        return {}
    if isinstance(props, Mapping):
        return props
    found = {}
    for key in (request.IMAGE_VERSION_KEY, request.IMAGE_MODEL_KEY):
        try:
            value = props.get(key)
        except Exception:  # an object without the field: treat as unset
            value = None
        if value is not None:
            found[key] = value
    return found


def recorded_secret(instance: Any) -> str | None:
    """The Barbican secret UUID recorded for the server, or None."""
    sysmeta = getattr(instance, "system_metadata", None) or {}
    value = sysmeta.get(SYSMETA_KEY)
    return value or None


def require_recorded_secret(instance: Any) -> str:
    """The recorded Barbican secret UUID.

    :raises VTPMSecretNotFound: none is recorded: the TPM state cannot be unlocked.
    """
    value = recorded_secret(instance)
    if value is None:
        raise exception.VTPMSecretNotFound(
            f"server {getattr(instance, 'uuid', '?')} has no vTPM secret recorded in "
            f"system_metadata['{SYSMETA_KEY}']: its vTPM state cannot be unlocked"
        )
    return value


def is_rescued(instance: Any) -> bool:
    """Whether the server is booted in rescue mode (:data:`RESCUE_KEY` is set)."""
    sysmeta = getattr(instance, "system_metadata", None) or {}
    return bool(sysmeta.get(RESCUE_KEY))


def server_label(instance: Any) -> str:
    """``'name' (uuid)`` for messages."""
    return f"{getattr(instance, 'name', '?')!r} ({getattr(instance, 'uuid', '?')})"
