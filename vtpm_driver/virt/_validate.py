"""Input checks shared by the ``virt`` modules (private)."""

from __future__ import annotations

import uuid as uuid_mod

from vtpm_driver import exception
from vtpm_driver.spec import show

__all__ = ["canonical_uuid", "show"]


def canonical_uuid(
    value: object, what: str, error: type[exception.VTPMError] = exception.VirtError
) -> str:
    """``value`` as libvirt writes a UUID (lowercase, dashed), else ``error``.

    Everything built from a UUID (XML, paths under the swtpm state dir) goes
    through here, so a hostile value can never reach a path or a document.
    """
    if not isinstance(value, str) or not value:
        raise error(f"invalid {what}={show(value)}: expected a UUID")
    try:
        return str(uuid_mod.UUID(value))
    except ValueError:
        raise error(f"invalid {what}={show(value)}: expected a UUID") from None
