"""The shim's one module-level change: vTPM validation inside Nova's libvirt driver.

Nova's libvirt driver asks ``hardware.get_vtpm_constraint(flavor, image_meta)``
"does this server have a vTPM, and which one?" in eight places, five of them
inside long generic methods (``spawn``, ``_create_guest``,
``_finish_migration_vtpm``, ``_add_vtpm_secret_to_live_migrate_data``,
``_validate_vtpm_configuration``) that the shim should not copy. So that
:mod:`vtpm_driver.spec` answers there too, :func:`install` replaces the name
``hardware`` in the module ``nova.virt.libvirt.driver`` (and nowhere else) with
:class:`HardwareView`: the real ``nova.virt.hardware`` with only
``get_vtpm_constraint`` swapped for
:func:`nova.virt.vtpm.translate.nova_vtpm_constraint`.

Scope and safety:

* ``nova.virt.hardware`` itself is untouched: the compute manager, the API and
  the scheduler keep Nova's function (the API's own vTPM checks still run).
* The replacement has Nova's contract (``VTPMConfig(version, model)`` or None;
  ``FlavorImageConflict``/``Invalid``) and is pure, so it does not depend on
  which driver object installed it.
* :func:`install` is idempotent and done by ``VTPMLibvirtDriver.__init__``;
  :func:`uninstall` restores the real module (tests).
"""

from __future__ import annotations

import inspect
import types
from typing import Any

from nova.virt import hardware
from nova.virt.libvirt import driver as libvirt_driver

from nova.virt.vtpm import translate

#: Nova's own function, as imported: anything else under that name is a replacement.
NOVAS_GET_VTPM_CONSTRAINT = hardware.get_vtpm_constraint


def get_vtpm_constraint(flavor: Any, image_meta: Any) -> Any:
    """What the libvirt driver module calls: our spec, unless Nova's function was replaced.

    ``nova.virt.hardware.get_vtpm_constraint`` is the seam Nova's tests (and a
    site's override) replace, e.g. with ``mock.patch.object(hardware, ...)``, to
    say "this server has (no) vTPM". Such a replacement is called instead, as
    with Nova's driver; Nova's own function is never called here.
    """
    current = hardware.get_vtpm_constraint
    if current is not NOVAS_GET_VTPM_CONSTRAINT:
        return current(flavor, image_meta)
    return translate.nova_vtpm_constraint(flavor, image_meta)


class HardwareView(types.ModuleType):
    """``nova.virt.hardware`` whose ``get_vtpm_constraint`` is :func:`get_vtpm_constraint`."""

    def __init__(self, real: types.ModuleType) -> None:
        super().__init__(real.__name__, real.__doc__)
        self.__dict__["_real"] = real
        self.get_vtpm_constraint = get_vtpm_constraint

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not set on the view: everything but
        # get_vtpm_constraint comes from the real module, looked up at call time.
        return getattr(self.__dict__["_real"], name)


def installed() -> bool:
    """Whether Nova's libvirt driver module currently sees :class:`HardwareView`."""
    return isinstance(libvirt_driver.hardware, HardwareView)


def install() -> None:
    """Route the libvirt driver's ``get_vtpm_constraint`` calls to our spec (idempotent)."""
    if not installed():
        libvirt_driver.hardware = HardwareView(hardware)


def own_static_methods(cls: type) -> type:
    """Class decorator: ``cls`` gets its own ``staticmethod`` for each one it inherits.

    Tools that patch a method by name (``fixtures.MonkeyPatch``, used by Nova's
    test fixtures on ``LibvirtDriver``) look for a ``staticmethod`` in the
    patched class's own ``__dict__``; on a subclass they find a plain
    function, install the replacement as an instance method, and the call
    gets ``self`` as its first argument (``TypeError: multiple values for
    argument 'target'`` from ``_create_ephemeral``). Each copy looks the
    parent's method up at call time, so inheritance is unchanged (a patch of
    Nova's class is seen through ours, as before); methods ``cls`` overrides
    are left alone.
    """
    parent = cls.__mro__[1]
    for klass in reversed(cls.__mro__[1:]):
        for name, attr in vars(klass).items():
            if (isinstance(attr, staticmethod) and name not in vars(cls)
                    and inspect.getattr_static(cls, name) is attr):
                setattr(cls, name, staticmethod(_inherited(parent, name, attr.__func__)))
    return cls


def _inherited(parent: type, name: str, original: Any) -> Any:
    """A function calling ``parent.<name>`` with ``original``'s name and signature.

    Only the signature is copied (not ``functools.wraps``' ``__wrapped__`` and
    ``__dict__``): ``original`` may itself be a test's autospec mock when the
    shim is imported while Nova's method is patched.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(parent, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = getattr(original, "__doc__", None)
    call.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
    return call


def uninstall() -> None:
    """Give the libvirt driver module the real ``nova.virt.hardware`` back."""
    if installed():
        libvirt_driver.hardware = hardware
