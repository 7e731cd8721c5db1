"""Minimal Instance / Flavor / ImageMeta with Nova's attribute names.

The driver only reads the attributes Nova's objects have, so a real Nova
``Instance`` can be passed in place of these (duck typing); the standalone CLI
builds these dataclasses instead.
"""

from __future__ import annotations

import dataclasses
import uuid as uuid_mod


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
    uuid: str = dataclasses.field(default_factory=lambda: str(uuid_mod.uuid4()))
    system_metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    console_log: str | None = None
    # Display names and creation time, kept in the standalone server record.
    user_name: str | None = None
    project_name: str | None = None
    created_at: str | None = None
    # Nova's resize bookkeeping: set by the caller (Nova's compute manager, or a
    # test standing in for it) around migrate_disk_and_power_off/finish_migration.
    old_flavor: Flavor | None = None
    new_flavor: Flavor | None = None

    @property
    def vtpm_secret_uuid(self) -> str | None:
        return self.system_metadata.get("vtpm_secret_uuid")

