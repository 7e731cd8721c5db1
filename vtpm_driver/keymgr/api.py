"""The key manager interface the vTPM core calls (SPEC D), as castellan's ``key_manager.py``.

Implementations: :class:`vtpm_driver.keymgr.barbican.KeyManager` (this
project's Barbican client) and, inside nova-compute, the shim's key managers
(``nova/virt/vtpm/keymgr.py``).
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["KeyManagerAPI"]


class KeyManagerAPI(Protocol):
    """What the vTPM core needs from a key manager (SPEC D).

    :class:`~vtpm_driver.keymgr.barbican.KeyManager` (Barbican, owner-only
    ACL, minimal round trips) is the implementation; the Nova shim may supply
    one over castellan. Every method maps foreign errors to
    :mod:`vtpm_driver.exception` types.
    """

    def create_vtpm_secret(self, context: Any, instance: Any,
                           secret_security: str) -> tuple[str, str]: ...

    def ensure_vtpm_secret(self, context: Any, instance: Any,
                           secret_security: str) -> tuple[str, str]: ...

    def get_vtpm_secret(self, context: Any, instance: Any,
                        secret_security: str | None = None) -> str: ...

    def delete_vtpm_secret(self, context: Any, instance: Any,
                           secret_security: str | None = None) -> None: ...
