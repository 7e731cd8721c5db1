"""The one Nova release this shim is written against, checked before anything else.

It also names the placement trait by which a compute node says it runs this
shim (:data:`DRIVER_TRAIT`): the shim reports it, the nova-api component
(``api.py``) asks for it.

The shim overrides private methods of Nova's libvirt driver (``_hard_reboot``,
``_get_or_create_secret_for_vtpm``, ...) whose names and arguments change
between releases. Running it on another release would fail in odd places at
run time, so nova-compute refuses to load it instead, saying which release to
install. :class:`UnsupportedNovaRelease` derives from ``ImportError`` because
that is what Nova's driver loader (``nova.virt.driver.load_compute_driver``)
reports as "Unable to load the virtualization driver" before exiting.
"""

from __future__ import annotations

from nova import version as nova_version

SUPPORTED_MAJOR = 34
SUPPORTED = f"nova {SUPPORTED_MAJOR}.x"
PIP_REQUIREMENT = f"nova=={SUPPORTED_MAJOR}.*"
COMPUTE_DRIVER = "the vtpm-driver Nova shim (compute_driver = vtpm.VTPMLibvirtDriver)"
API_COMPONENT = "the vtpm-driver nova-api component (paste filter nova.virt.vtpm.api)"
#: What to do instead of installing the supported release, per component.
_OR_ELSE = {COMPUTE_DRIVER: "set [DEFAULT] compute_driver = libvirt.LibvirtDriver",
            API_COMPONENT: "remove the vtpm filter from nova-api's api-paste.ini"}

#: Reported on every compute node whose nova-compute runs this shim.
DRIVER_TRAIT = "CUSTOM_VTPM_DRIVER"


class UnsupportedNovaRelease(ImportError):
    """The installed Nova is not the release this shim supports."""


def installed_release() -> str:
    """The installed Nova's version string, e.g. ``34.0.0`` (pbr metadata)."""
    return str(nova_version.version_string())


def check_nova_release(found: str | None = None, component: str = COMPUTE_DRIVER) -> str:
    """Return the installed release if it is supported, else refuse clearly.

    ``component`` (:data:`COMPUTE_DRIVER` or :data:`API_COMPONENT`) is named in
    the refusal, with what to do instead.

    :raises UnsupportedNovaRelease: names the release found and the one needed.
    """
    found = installed_release() if found is None else found
    major = found.split(".", 1)[0].strip()
    if not major.isdigit() or int(major) != SUPPORTED_MAJOR:
        raise UnsupportedNovaRelease(
            f"{component} supports {SUPPORTED} only, but nova {found!r} is installed: "
            f"install '{PIP_REQUIREMENT}', or {_OR_ELSE[component]}"
        )
    return found
