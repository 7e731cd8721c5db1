"""The key manager the vTPM core uses inside nova-compute, chosen by ``[key_manager] backend``.

* ``barbican`` (castellan's default, by stevedore name or class path):
  :class:`OwnerOnlyBarbican`, this project's :class:`vtpm_driver.keymgr.KeyManager`
  (owner-only read ACL, one request per step) given our request context.
* anything else (Vault, a test's fake): :class:`CastellanKeyManager`, Nova's own
  castellan key manager through ``nova.crypto`` (the same object Nova uses),
  after one warning that owner-only ACLs are Barbican-only.

Both take Nova's ``RequestContext`` and implement
:class:`vtpm_driver.keymgr.KeyManagerAPI`; ``token_required`` tells the core
whether a request without a token can reach the key manager at all.
castellan's and Nova's errors are mapped once, in :func:`castellan_errors`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from castellan.common import exception as castellan_exception
from nova import context as nova_context
from nova import crypto
from nova import exception as nova_exception
from oslo_config import cfg
from oslo_log import log as logging

from nova.virt.vtpm import translate
from vtpm_driver import exception, keymgr
from vtpm_driver.model import request, rules
from vtpm_driver.model.server import recorded_secret, require_recorded_secret, server_label
from vtpm_driver.ops import consents as ops_consents

LOG = logging.getLogger(__name__)

BARBICAN_BACKENDS = frozenset({
    "barbican",
    "castellan.key_manager.barbican_key_manager.BarbicanKeyManager",
})


def backend(conf: cfg.ConfigOpts) -> str:
    """``[key_manager] backend`` (castellan's option, default ``barbican``)."""
    from castellan import key_manager as castellan_key_manager

    conf.register_opts(castellan_key_manager.key_manager_opts, group="key_manager")
    return str(conf.key_manager.backend or "barbican")


def build(conf: cfg.ConfigOpts) -> OwnerOnlyBarbican | CastellanKeyManager:
    """The key manager for ``conf``'s backend (see the module docstring)."""
    name = backend(conf)
    if name in BARBICAN_BACKENDS:
        return OwnerOnlyBarbican(keymgr.KeyManager(conf))
    LOG.warning("[key_manager] backend is %s: vTPM passphrases go through castellan, "
                "and owner-only read ACLs (readable by the server's owner only) are "
                "available with the barbican backend only", name)
    return CastellanKeyManager()


class OwnerOnlyBarbican:
    """:class:`vtpm_driver.keymgr.KeyManager` taking Nova's request context.

    Like ``nova.crypto``, it saves the instance when it records a new secret.
    """

    token_required = True

    def __init__(self, barbican: keymgr.KeyManagerAPI) -> None:
        self.barbican = barbican

    def __repr__(self) -> str:
        return f"OwnerOnlyBarbican({self.barbican!r})"

    def acting_context(self, context: Any, instance: Any, operation: str) -> Any:
        """Nova's ``context``, or the owner's by their consent to ``operation``
        (:func:`vtpm_driver.ops.consents.acting_context`)."""
        return ops_consents.acting_context(self.barbican, instance, context, operation)

    def create_vtpm_secret(self, context: Any, instance: Any,
                           secret_security: str) -> tuple[str, str]:
        """Create it; the new ``vtpm_secret_uuid`` is saved, as ``nova.crypto`` does."""
        created = self.barbican.create_vtpm_secret(
            translate.request_context(context), instance, secret_security)
        instance.save()
        return created

    def ensure_vtpm_secret(self, context: Any, instance: Any,
                           secret_security: str) -> tuple[str, str]:
        """The recorded secret, else a new one whose UUID is saved, as ``nova.crypto`` does."""
        recorded = recorded_secret(instance)
        found = self.barbican.ensure_vtpm_secret(
            translate.request_context(context), instance, secret_security)
        if recorded_secret(instance) != recorded:
            instance.save()
        return found

    def get_vtpm_secret(self, context: Any, instance: Any,
                        secret_security: str | None = None) -> str:
        return self.barbican.get_vtpm_secret(
            translate.request_context(context), instance, secret_security)

    def delete_vtpm_secret(self, context: Any, instance: Any,
                           secret_security: str | None = None) -> None:
        self.barbican.delete_vtpm_secret(
            translate.request_context(context), instance, secret_security)

    def store_ek_certificate(self, context: Any, instance: Any, secret_security: str,
                             pem: str) -> str:
        """Publish a new TPM's EK certificate (``EKCertificateStore``); its UUID is saved."""
        stored = self.barbican.store_ek_certificate(
            translate.request_context(context), instance, secret_security, pem)
        instance.save()
        return stored

    def delete_ek_certificate(self, context: Any, instance: Any,
                              secret_security: str | None = None) -> None:
        self.barbican.delete_ek_certificate(
            translate.request_context(context), instance, secret_security)


@contextlib.contextmanager
def castellan_errors(instance: Any) -> Iterator[None]:
    """castellan's (and ``nova.crypto``'s) errors as ours.

    castellan drops Barbican's HTTP status; ``nova.crypto`` then recognises a
    refusal by the word "Forbidden" and raises ``VTPMSecretForbidden``, whose
    message (the key manager's) is kept.
    """
    label = server_label(instance)
    try:
        yield
    except (nova_exception.VTPMSecretForbidden, nova_exception.Forbidden) as exc:
        raise exception.VTPMSecretForbidden(
            f"the vTPM secret of server {label} needs the owner's credentials: {exc}"
        ) from None
    except castellan_exception.ManagedObjectNotFoundError:
        raise exception.VTPMSecretNotFound(
            f"the vTPM secret of server {label} is missing from the key manager: its "
            "vTPM is unrecoverable"
        ) from None
    except (castellan_exception.KeyManagerError, nova_exception.KeyManagerError) as exc:
        raise exception.KeyManagerUnavailable(
            f"the key manager failed for the vTPM secret of server {label}: {exc}"
        ) from None


class CastellanKeyManager:
    """Nova's castellan key manager (``nova.crypto``), as a ``KeyManagerAPI``.

    ``deployment`` secrets are made and read as Nova's service user
    (``nova.context.get_nova_service_user_context``), the others as the
    caller, as Nova does. Secrets are Nova's: same name, size and
    ``system_metadata`` key; castellan's backend decides who may read them.
    """

    token_required = False

    def __repr__(self) -> str:
        return "CastellanKeyManager()"

    @staticmethod
    def acting_context(context: Any, instance: Any, operation: str) -> Any:
        """Always ``context``: an owner's consent is carried by Barbican and Keystone."""
        return context

    @staticmethod
    def _context(context: Any, secret_security: str | None, instance: Any) -> Any:
        mode = secret_security or rules.secret_security(instance.flavor, strict=False)
        if mode == request.SECRET_DEPLOYMENT:
            return nova_context.get_nova_service_user_context()
        return context

    def create_vtpm_secret(self, context: Any, instance: Any,
                           secret_security: str) -> tuple[str, str]:
        """Create it (``nova.crypto``); refuses when one is already recorded."""
        if recorded_secret(instance):
            raise exception.VTPMError(
                f"server {instance.uuid} already has a vTPM secret recorded")
        return self.ensure_vtpm_secret(context, instance, secret_security)

    def ensure_vtpm_secret(self, context: Any, instance: Any,
                           secret_security: str) -> tuple[str, str]:
        """The recorded secret, else a new one recorded in ``system_metadata``."""
        with castellan_errors(instance):
            secret_uuid, passphrase = crypto.ensure_vtpm_secret(
                self._context(context, secret_security, instance), instance)
        if isinstance(passphrase, bytes):
            passphrase = passphrase.decode("ascii")
        return str(secret_uuid), passphrase

    def get_vtpm_secret(self, context: Any, instance: Any,
                        secret_security: str | None = None) -> str:
        """The recorded secret's passphrase.

        :raises VTPMSecretNotFound: none recorded, or the key manager lost it.
        """
        require_recorded_secret(instance)
        mode = secret_security or rules.secret_security(instance.flavor, strict=False)
        return self.ensure_vtpm_secret(context, instance, mode)[1]

    def delete_vtpm_secret(self, context: Any, instance: Any,
                           secret_security: str | None = None) -> None:
        """Delete it and its ``system_metadata`` key; idempotent."""
        with castellan_errors(instance):
            crypto.delete_vtpm_secret(
                self._context(context, secret_security, instance), instance)
