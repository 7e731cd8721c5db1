"""vtpm-driver's Nova edge: the shim and the nova-api component.

``[DEFAULT] compute_driver = vtpm.VTPMLibvirtDriver`` loads the shim (Nova's
libvirt driver with our vTPM steps); ``nova.virt.vtpm.api`` is the opt-in
nova-api component. This package is shipped by the vtpm-driver distribution
*into* Nova's ``nova.virt`` package (it ships no ``nova/__init__.py`` nor
``nova/virt/__init__.py``), because Nova loads drivers only from
``nova.virt.<compute_driver>``. Each part checks the Nova release before it
imports anything of Nova's; see README.rst beside this file.

The driver is imported on first use (Nova's loader asks for
``VTPMLibvirtDriver``), so that nova-api, which loads only the component,
never imports Nova's libvirt driver.
"""

from typing import Any

from nova.virt.vtpm import release

__all__ = ["VTPMLibvirtDriver"]


def __getattr__(name: str) -> Any:
    if name == "VTPMLibvirtDriver":
        release.check_nova_release()
        from nova.virt.vtpm.driver import VTPMLibvirtDriver

        return VTPMLibvirtDriver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
