"""The passphrase's hand-over when Nova moves a vTPM server to another host (once).

Nova moves the guest (its own live migration: libvirt's migration stream
carries swtpm's state, and the destination's swtpm re-encrypts it with the
same passphrase); the shim (``nova/virt/vtpm/migrate.py``) calls these steps
at Nova's seams so the destination's swtpm has the passphrase in every secret
mode. The one rule is :func:`vtpm_driver.model.rules.check_may_migrate`:

* ``host``: read from the source host's persistent libvirt secret (no owner
  needed, as in Nova), defined persistent on the destination BEFORE the move,
  removed from the source AFTER it;
* ``user``: read once from Barbican with the owner's credentials (anyone else:
  ``VTPMSecretForbidden``, nothing moved), handed to the destination as an
  ephemeral private secret, undefined as soon as the incoming guest runs;
* ``deployment``: the same with the service user's credentials.

It is read BEFORE anything is touched; a failed move leaves no secret of the
server on the destination (:func:`forget_destination`). The steps use only a
:class:`~vtpm_driver.ops.secrets.SecretStore` and a
:class:`~vtpm_driver.keymgr.KeyManagerAPI`: no libvirt, no Nova.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vtpm_driver.keymgr import KeyManagerAPI
from vtpm_driver.model import rules
from vtpm_driver.model.request import VTPMConfig
from vtpm_driver.model.rules import SecretSource
from vtpm_driver.model.server import require_recorded_secret
from vtpm_driver.ops import secrets as ops_secrets
from vtpm_driver.ops.secrets import SecretStore, StartSecret

#: Reads a host-mode passphrase from the source host's libvirt (None: not there).
HostSecret = Callable[[str], "str | None"]


def fetch_secret(context: Any, instance: Any, cfg: VTPMConfig | None, keymgr: KeyManagerAPI,
                 host_secret: HostSecret | None = None, *, live: bool = True
                 ) -> StartSecret | None:
    """The passphrase the destination will need, read once, before anything moves.

    :returns: None without a vTPM.
    :raises VTPMSecretForbidden: ``user`` mode and the caller is not the owner,
        or Barbican refused the caller.
    :raises VTPMSecretNotFound: no secret recorded, or Barbican lost it.
    :raises KeyManagerUnavailable: Barbican is down.
    """
    source = rules.check_may_migrate(cfg, instance, context, live=live)
    if cfg is None or source is SecretSource.NONE:
        return None
    secret_uuid = require_recorded_secret(instance)
    persistent = rules.uses_persistent_secret(cfg.secret_security)
    passphrase = None
    if source is SecretSource.HOST and host_secret is not None:
        passphrase = host_secret(secret_uuid)
    if passphrase is None:
        passphrase = keymgr.get_vtpm_secret(context, instance, cfg.secret_security)
    return StartSecret(secret_uuid, passphrase, persistent)


def give_destination(secrets: SecretStore, instance: Any, start: StartSecret | None) -> None:
    """Define the secret on the destination before the guest arrives (replaces a leftover)."""
    if start is not None:
        ops_secrets.define_for_start(secrets, instance, start)


def incoming_running(secrets: SecretStore, instance: Any, start: StartSecret | None) -> None:
    """The incoming swtpm has the key: undefine an ephemeral secret (E3); idempotent."""
    ops_secrets.after_start(secrets, instance, start)


def forget_destination(secrets: SecretStore, instance: Any) -> None:
    """Rollback: no vTPM secret of the server stays on the destination; idempotent."""
    ops_secrets.remove_libvirt_secrets(secrets, instance)
