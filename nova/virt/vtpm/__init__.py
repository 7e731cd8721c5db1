"""vtpm-driver's Nova shim: ``[DEFAULT] compute_driver = vtpm.VTPMLibvirtDriver``.

This package is shipped by the vtpm-driver distribution *into* Nova's
``nova.virt`` package (it ships no ``nova/__init__.py`` nor
``nova/virt/__init__.py``), because Nova loads drivers only from
``nova.virt.<compute_driver>``. The Nova release is checked before anything
else is imported; see README.rst beside this file.
"""

from nova.virt.vtpm import release

release.check_nova_release()

from nova.virt.vtpm.driver import VTPMLibvirtDriver  # noqa: E402

__all__ = ["VTPMLibvirtDriver"]
