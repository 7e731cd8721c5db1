"""The key manager interfaces (SPEC D), as castellan's ``key_manager.py``.

* :class:`KeyManagerAPI`: what the vTPM core calls for one server's secret.
  Implementations: :class:`vtpm_driver.keymgr.barbican.KeyManager` (this
  project's Barbican client) and, inside nova-compute, the shim's key managers
  (``nova/virt/vtpm/keymgr.py``).
* :class:`KeyManagerAuditAPI`: what ``vtpm-driver audit`` calls to list vTPM
  secrets and repair them by secret UUID; Barbican only (castellan has no
  listing by name nor ACLs).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from vtpm_driver.model import request

__all__ = ["KEY_MANAGER_SERVICE_TYPE", "KeyManagerAPI", "KeyManagerAuditAPI"]

#: The key manager's service type in a Keystone catalog (Barbican's, castellan's).
KEY_MANAGER_SERVICE_TYPE = "key-manager"


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


@runtime_checkable
class EKCertificateStore(Protocol):
    """Where a server's EK certificate is published for its owner (issue 22).

    Beside the passphrase, with the same owner and read ACL, as a Barbican
    ``certificate`` secret named ``vTPM EK certificate for instance <uuid>``
    (PEM: the EK certificate, then its CA chain), recorded in
    ``system_metadata['vtpm_ek_certificate_uuid']``.
    """

    def store_ek_certificate(self, context: Any, instance: Any, secret_security: str,
                             pem: str) -> str:
        """Publish it; its UUID (also recorded).

        :raises VTPMError: one is already recorded (it would be orphaned).
        """
        ...

    def delete_ek_certificate(self, context: Any, instance: Any,
                              secret_security: str | None = None) -> None:
        """Delete the recorded one and its key; idempotent."""
        ...


class KeyManagerAuditAPI(Protocol):
    """What the audit needs from a key manager: metadata and repairs, never payloads.

    ``secret_security`` picks whose credentials are used (the caller's, or
    the service user's in ``deployment`` mode). Foreign errors are mapped to
    :mod:`vtpm_driver.exception` types.
    """

    def list_vtpm_secrets(self, context: Any, secret_security: str = request.SECRET_USER
                          ) -> list[dict[str, str | None]]:
        """vTPM secrets visible in that scope: ``uuid``, ``name``, ``instance_uuid``,
        ``created``, ``creator``."""
        ...

    def secret_project_access(self, context: Any, secret_uuid: str,
                              secret_security: str = request.SECRET_USER) -> bool:
        """Whether the whole project may read the secret."""
        ...

    def set_owner_only_acl(self, context: Any, secret_uuid: str, user_id: str | None,
                           secret_security: str = request.SECRET_USER) -> None:
        """Limit reads to ``user_id`` (and the creator); idempotent."""
        ...

    def delete_secret(self, context: Any, secret_uuid: str,
                      secret_security: str = request.SECRET_USER) -> bool:
        """Delete an orphan by UUID; False if it was already gone."""
        ...
