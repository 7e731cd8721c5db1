"""The one fake host probe (:class:`vtpm_driver.model.hostcheck.HostProbe`), for unit tests.

Every fact is settable; a value that is an exception is raised instead (e.g.
``version_info=HypervisorUnavailable(...)`` for an unreachable libvirt).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "unit" / "data"
SWTPM_BINARIES = frozenset({"swtpm", "swtpm_setup", "swtpm_ioctl"})


def domcaps(name: str = "domcaps-qemu-host.xml") -> str:
    """A captured ``virsh domcapabilities`` document from ``tests/unit/data``."""
    return (DATA / name).read_text()


@dataclasses.dataclass
class FakeProbe:
    """A sound qemu host (every trait) unless told otherwise; records what was asked."""

    xml: str | Exception = dataclasses.field(default_factory=domcaps)
    #: The q35 machine's (OVMF with Secure Boot installed).
    q35_xml: str | Exception = dataclasses.field(
        default_factory=lambda: domcaps("domcaps-q35-secure-boot.xml"))
    binaries: set[str] = dataclasses.field(
        default_factory=lambda: {*SWTPM_BINARIES, "swtpm_localca"})
    users: set[str] = dataclasses.field(default_factory=lambda: {"tss"})
    groups: set[str] = dataclasses.field(default_factory=lambda: {"tss"})
    version_info: dict[str, str] | Exception = dataclasses.field(
        default_factory=lambda: {"libvirt": "9.0.0", "qemu": "7.2.0", "swtpm": "0.7.1"}
    )
    banks: frozenset[str] = frozenset({"sha1", "sha256", "sha384", "sha512"})
    asked_virt_types: list[str] = dataclasses.field(default_factory=list)
    closed: bool = False
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)

    def domain_capabilities(self, virt_type: str, machine: str | None = None) -> str:
        if machine is not None:  # the q35 machine asked for Secure Boot firmware
            if isinstance(self.q35_xml, Exception):
                raise self.q35_xml
            return self.q35_xml
        self.asked_virt_types.append(virt_type)
        if isinstance(self.xml, Exception):
            raise self.xml
        return self.xml

    def which(self, name: str) -> str | None:
        return f"/usr/bin/{name}" if name in self.binaries else None

    def user_exists(self, name: str) -> bool:
        return name in self.users

    def group_exists(self, name: str) -> bool:
        return name in self.groups

    def versions(self) -> dict[str, str]:
        if isinstance(self.version_info, Exception):
            raise self.version_info
        return dict(self.version_info)

    def pcr_banks(self) -> frozenset[str]:
        return self.banks

    def read_file(self, path: str) -> bytes:
        if path not in self.files:
            raise FileNotFoundError(2, "No such file or directory", path)
        return self.files[path]

    def close(self) -> None:
        self.closed = True
