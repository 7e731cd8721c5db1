"""Live migration of vTPM servers through Nova: translation to :mod:`vtpm_driver.ops.migrate`.

Nova's libvirt driver moves the guest (its own ``live_migration``, libvirt's
migration stream carries swtpm's state). What the destination's swtpm needs is
the passphrase, in a libvirt secret, while the incoming guest starts. Nova 34
does that for ``host`` secret security only; these functions do it for every
mode, at Nova's own seams (``VTPMLibvirtDriver`` calls them):

===============================================  ===================================
Nova seam (host)                                 here -> vtpm_driver
===============================================  ===================================
``check_can_live_migrate_source`` (source)       :func:`check_source` ->
                                                 ``rules.check_may_migrate``
``_add_vtpm_secret_to_live_migrate_data``        :func:`add_to_migrate_data` ->
(source)                                         ``ops.migrate.fetch_secret`` (host
                                                 mode: the source's libvirt secret)
``pre_live_migration`` (destination)             :func:`give_destination` ->
                                                 ``fetch_secret`` (user/deployment:
                                                 Barbican, caller's or service
                                                 user's credentials) +
                                                 ``ops.migrate.give_destination``
``post_live_migration_at_destination``           :func:`incoming_running` ->
                                                 ``ops.migrate.incoming_running``
``post_live_migration`` (source)                 :func:`forget_source` ->
                                                 ``ops.secrets.remove_libvirt_secrets``
``rollback_live_migration_at_destination``       :func:`forget_destination` ->
                                                 ``ops.migrate.forget_destination``
===============================================  ===================================

Where the passphrase travels: in ``host`` mode as Nova does it (read from the
source's persistent libvirt secret into ``LibvirtLiveMigrateData``, a
``SensitiveStringField``, over RPC to the destination). In ``user`` and
``deployment`` mode the migrate data carries the secret's UUID only: the
destination reads the passphrase from Barbican itself, once, with the
request's credentials (the owner's in ``user`` mode, anyone else is refused on
the source before anything is touched) or the service user's, and defines it as
an ephemeral private secret that is undefined once the guest runs there. In
every mode the value is dropped from the migrate data as soon as the
destination has defined it, so it does not travel back to the source.

Nova's API still refuses live migration of ``user``/``deployment`` servers
(``reject_legacy_vtpm_live_migration``) before any of this runs; see
README.rst beside this file, "Migration".
"""

from __future__ import annotations

from typing import Any

from nova import exception as nova_exception

from nova.virt.vtpm import translate
from vtpm_driver import exception
from vtpm_driver.keymgr import KeyManagerAPI
from vtpm_driver.model import rules
from vtpm_driver.model.server import recorded_secret
from vtpm_driver.ops import migrate as ops_migrate
from vtpm_driver.ops import secrets as ops_secrets
from vtpm_driver.ops.secrets import SecretStore, StartSecret

USAGE_TYPE = "vtpm"
# Nova's own message (its functional tests look for it).
_HOST_SECRET_MISSING = ("TPM secret was not found. Try hard-rebooting the instance to "
                        "recover.")


def _config(instance: Any) -> Any:
    return translate.vtpm_config(instance.flavor, instance.image_meta)


def host_secret_reader(nova_host: Any, instance_uuid: str) -> ops_migrate.HostSecret:
    """Reads the passphrase of this host's persistent secret for the server (or None).

    Through Nova's ``Host`` (no libvirt import here); only a secret with the
    recorded UUID counts.
    """

    def read(secret_uuid: str) -> str | None:
        found = nova_host.find_secret(USAGE_TYPE, instance_uuid)
        if found is None or str(found.UUIDString()) != secret_uuid:
            return None
        return bytes(found.value()).decode("ascii")

    return read


def check_source(context: Any, instance: Any, *, live: bool = True) -> None:
    """Refuse, before anything is touched, a move whose passphrase the caller cannot hand over.

    :raises nova.exception.MigrationPreCheckError: ``user`` mode and the caller
        is not the owner (the conductor then leaves the server ACTIVE where it is).
    """
    try:
        rules.check_may_migrate(_config(instance), instance, context, live=live)
    except exception.VTPMSecretForbidden as exc:
        raise nova_exception.MigrationPreCheckError(reason=str(exc)) from exc


def add_to_migrate_data(instance: Any, data: Any, nova_host: Any,
                        keymgr: KeyManagerAPI) -> None:
    """Fill ``data.vtpm_secret_uuid``/``vtpm_secret_value`` on the source (Nova's fields).

    ``host`` mode: the UUID and value of the source's libvirt secret (Nova's
    behaviour, missing secret included). Other modes: the UUID only, the
    destination reads the value itself. No vTPM: the fields stay unset.

    :raises nova.exception.VTPMSecretNotFound: ``host`` mode without the
        libvirt secret on this host (hard reboot re-creates it).
    """
    cfg = _config(instance)
    if cfg is None:
        return
    source = rules.migration_secret_source(cfg)
    if source is rules.SecretSource.HOST:
        reader = host_secret_reader(nova_host, instance.uuid)
        recorded = recorded_secret(instance)
        if recorded is None or reader(recorded) is None:
            raise nova_exception.VTPMSecretNotFound(_HOST_SECRET_MISSING)
        with translate.nova_errors():
            # context is not needed: the host's secret answers before Barbican would.
            start = ops_migrate.fetch_secret(None, instance, cfg, keymgr, reader, live=True)
        data.vtpm_secret_uuid = start.secret_uuid
        data.vtpm_secret_value_bytes = start.passphrase.encode("ascii")
        return
    data.vtpm_secret_uuid = recorded_secret(instance)
    data.vtpm_secret_value = None


def give_destination(context: Any, instance: Any, data: Any, secrets: SecretStore,
                     keymgr: KeyManagerAPI) -> StartSecret | None:
    """On the destination, before the guest arrives: define the secret swtpm will need.

    The passphrase comes from the migrate data (``host`` mode) or from Barbican
    (:func:`vtpm_driver.ops.migrate.fetch_secret`, the request's credentials).
    The value is then removed from ``data`` (it goes back to the source).

    :raises nova.exception.VTPMSecretForbidden: the caller may not read it.
    :raises nova.exception.VTPMSecretNotFound: nothing to read.
    """
    cfg = _config(instance)
    if cfg is None:
        return None
    with translate.nova_errors():
        if getattr(data, "has_vtpm_secret_data", False):
            value = data.vtpm_secret_value_bytes.decode("ascii")
            start = ops_migrate.fetch_secret(
                context, instance, cfg, keymgr, lambda _uuid: value, live=True)
        else:
            start = ops_migrate.fetch_secret(context, instance, cfg, keymgr, live=True)
        ops_migrate.give_destination(secrets, instance, start)
    if data is not None and getattr(data, "has_vtpm", False):
        data.vtpm_secret_value = None  # Nova's pre_live_migration defines nothing more
    return start


def incoming_running(instance: Any, secrets: SecretStore, start: StartSecret | None) -> None:
    """The guest runs on the destination: an ephemeral secret is undefined (idempotent).

    ``start`` None (nova-compute restarted since ``pre_live_migration``): every
    non-persistent vTPM secret of the server is removed.
    """
    cfg = _config(instance)
    if cfg is None:
        return
    with translate.nova_errors():
        if start is not None:
            ops_migrate.incoming_running(secrets, instance, start)
        elif not rules.uses_persistent_secret(cfg.secret_security):
            ops_migrate.forget_destination(secrets, instance)


def forget_source(instance: Any, secrets: SecretStore) -> None:
    """After the move of a vTPM server: none of its secrets stays on the source (idempotent).

    The caller knows it moved with a vTPM (Nova's migrate data, ``has_vtpm``).
    """
    with translate.nova_errors():
        ops_secrets.remove_libvirt_secrets(secrets, instance)


def forget_destination(instance: Any, secrets: SecretStore) -> None:
    """After a failed move of a vTPM server: none of its secrets stays here (idempotent).

    The caller knows it was moving with a vTPM (Nova's migrate data, ``has_vtpm``).
    """
    with translate.nova_errors():
        ops_migrate.forget_destination(secrets, instance)
