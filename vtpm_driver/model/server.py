"""THE server model: Instance / Flavor / ImageMeta with Nova's attribute names.

The driver only reads the attributes Nova's objects have, so a real Nova
``Instance`` can be passed in place of these (duck typing); the standalone CLI
builds these dataclasses. The standalone server record in a domain's
``<metadata>`` is this model serialised (:mod:`vtpm_driver.virt.record`), and
the operator audit works on it too (:mod:`vtpm_driver.audit`).

UUIDs are checked with oslo.utils (:func:`canonical_uuid`,
:func:`require_uuid`), once for every module that builds paths, XML or
comparisons from them.
"""

from __future__ import annotations

import dataclasses
import uuid as uuid_mod

from oslo_utils import uuidutils

from vtpm_driver import exception
from vtpm_driver.model.request import show


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
        return self.system_metadata.get("vtpm_secret_uuid")
