"""The libvirt ``vtpm`` secret that hands the passphrase to swtpm (SPEC E1, E3).

libvirt reads the passphrase from a secret object whose UUID is the one in
``<encryption secret=...>``; we reuse the Barbican secret's UUID, as Nova does,
so the two are easy to match up. Its usage name is the instance UUID, which
libvirt keeps unique: one vTPM secret per server.

* ``user``/``deployment`` mode: ``ephemeral='yes' private='yes'``: never written
  to disk, never readable back through the API, and undefined as soon as the
  guest has started (or failed to) - :func:`vtpm_driver.ops.secrets.secret_for_start`
  orders that, over :class:`LibvirtSecretStore`.
* ``host`` mode: ``ephemeral='no' private='no'``: persists so the guest can be
  restarted without the owner's credentials.

The value is only ever passed to ``virSecret.setValue``; it is never part of the
XML, a log line or an exception message.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import libvirt
from lxml import etree
from oslo_log import log as logging

from vtpm_driver import exception
from vtpm_driver.model.server import require_uuid
from vtpm_driver.virt import connection

LOG = logging.getLogger(__name__)

USAGE_TYPE = "vtpm"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=True)


class VTPMSecretInfo(NamedTuple):
    """One libvirt vTPM secret as listed (no value, of course)."""

    uuid: str
    usage_id: str
    ephemeral: bool
    private: bool


def _secret_uuid(value: object) -> str:
    return require_uuid(value, "vtpm_secret_uuid", exception.InvalidVTPMConfig)


def _instance_uuid(value: object) -> str:
    return require_uuid(value, "instance uuid", exception.InvalidVTPMConfig)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def secret_xml(secret_uuid: str, instance_uuid: str, *, ephemeral: bool, private: bool) -> str:
    """The ``<secret>`` document for a vTPM secret (never holds the value)."""
    secret_uuid = _secret_uuid(secret_uuid)
    instance_uuid = _instance_uuid(instance_uuid)
    root = etree.Element("secret", ephemeral=_yes_no(ephemeral), private=_yes_no(private))
    etree.SubElement(root, "uuid").text = secret_uuid
    etree.SubElement(root, "description").text = f"vTPM secret for instance {instance_uuid}"
    usage = etree.SubElement(root, "usage", type=USAGE_TYPE)
    etree.SubElement(usage, "name").text = instance_uuid
    return etree.tostring(root, encoding="unicode", pretty_print=True)


def parse_secret_xml(xml: str) -> VTPMSecretInfo | None:
    """(uuid, usage_id, ephemeral, private) of a ``<secret>`` doc; None if not vtpm."""
    try:
        root = etree.fromstring(xml.encode(), _PARSER)
    except etree.XMLSyntaxError as exc:
        raise exception.VirtError(f"libvirt returned unparsable secret XML: {exc}") from None
    if root.findtext("usage[@type='vtpm']/name") is None:
        return None
    return VTPMSecretInfo(
        uuid=(root.findtext("uuid") or "").strip(),
        usage_id=(root.findtext("usage/name") or "").strip(),
        ephemeral=root.get("ephemeral", "no") == "yes",
        private=root.get("private", "no") == "yes",
    )


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    if isinstance(passphrase, str):
        passphrase = passphrase.encode()
    if not isinstance(passphrase, bytes) or not passphrase:
        # Never show the value, not even its type's repr of it.
        raise exception.InvalidVTPMConfig("vTPM passphrase is empty or not text")
    return passphrase


def lookup_vtpm_secret(conn: libvirt.virConnect, secret_uuid: str) -> libvirt.virSecret | None:
    """The vTPM secret with this UUID, or None when libvirt has none.

    :raises VirtError: a secret with this UUID exists but is not a vTPM secret.
    """
    secret_uuid = _secret_uuid(secret_uuid)
    try:
        secret = conn.secretLookupByUUIDString(secret_uuid)
        usage_type = secret.usageType()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
            return None
        raise connection.to_vtpm_error(exc, f"look up libvirt secret {secret_uuid}") from exc
    if usage_type != libvirt.VIR_SECRET_USAGE_TYPE_VTPM:
        raise exception.VirtError(
            f"libvirt secret {secret_uuid} exists but is not a vTPM secret "
            f"(usage type {usage_type})"
        )
    return secret


def lookup_vtpm_secret_by_instance(
    conn: libvirt.virConnect, instance_uuid: str
) -> libvirt.virSecret | None:
    """The vTPM secret whose usage name is this instance UUID, or None."""
    instance_uuid = _instance_uuid(instance_uuid)
    try:
        return conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_VTPM, instance_uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
            return None
        raise connection.to_vtpm_error(
            exc, f"look up libvirt vTPM secret of instance {instance_uuid}"
        ) from exc


def define_vtpm_secret(
    conn: libvirt.virConnect,
    secret_uuid: str,
    instance_uuid: str,
    passphrase: str | bytes,
    *,
    persistent: bool,
) -> libvirt.virSecret:
    """Define the vTPM secret and set its value.

    ``persistent=False`` (``user``/``deployment``): ephemeral and private.
    ``persistent=True`` (``host``): stored by libvirt and readable by root.
    If setting the value fails the secret is undefined again before raising,
    so no secret without a usable value is left behind.

    :raises VirtError: libvirt refused (e.g. another secret already serves this
        instance, or a secret with this UUID exists with other flags).
    """
    value = _passphrase_bytes(passphrase)
    secret_uuid = _secret_uuid(secret_uuid)
    instance_uuid = _instance_uuid(instance_uuid)
    xml = secret_xml(
        secret_uuid, instance_uuid, ephemeral=not persistent, private=not persistent
    )
    try:
        secret = conn.secretDefineXML(xml)
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(
            exc, f"define libvirt vTPM secret {secret_uuid} for instance {instance_uuid}"
        ) from exc
    try:
        secret.setValue(value)
    except libvirt.libvirtError as exc:
        error = connection.to_vtpm_error(exc, f"set value of libvirt vTPM secret {secret_uuid}")
        _undefine_quietly(secret, secret_uuid)
        raise error from exc
    LOG.debug(
        "Defined libvirt vTPM secret %s for instance %s (persistent=%s)",
        secret_uuid, instance_uuid, persistent,
    )
    return secret


def _undefine_quietly(secret: libvirt.virSecret, secret_uuid: str) -> None:
    try:
        secret.undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
            LOG.error(
                "Could not undefine libvirt vTPM secret %s after a failure: %s",
                secret_uuid, connection.describe(exc),
            )


def undefine_vtpm_secret(conn: libvirt.virConnect, secret_uuid: str) -> bool:
    """Undefine the vTPM secret; True if it existed, False if already gone."""
    secret_uuid = _secret_uuid(secret_uuid)
    secret = lookup_vtpm_secret(conn, secret_uuid)
    if secret is None:
        return False
    try:
        secret.undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
            return False
        raise connection.to_vtpm_error(exc, f"undefine libvirt secret {secret_uuid}") from exc
    LOG.debug("Undefined libvirt vTPM secret %s", secret_uuid)
    return True


def list_vtpm_secrets(conn: libvirt.virConnect) -> list[VTPMSecretInfo]:
    """Every vTPM secret libvirt holds, sorted by UUID (for audits and orphans)."""
    try:
        secrets = conn.listAllSecrets(0)
    except libvirt.libvirtError as exc:
        raise connection.to_vtpm_error(exc, "list libvirt secrets") from exc
    found = []
    for secret in secrets:
        try:
            if secret.usageType() != libvirt.VIR_SECRET_USAGE_TYPE_VTPM:
                continue
            xml = secret.XMLDesc(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                continue  # undefined while we listed
            raise connection.to_vtpm_error(exc, "list libvirt secrets") from exc
        info = parse_secret_xml(xml)
        if info is not None:
            found.append(info)
    return sorted(found)


class LibvirtSecretStore:
    """:class:`vtpm_driver.ops.secrets.SecretStore` over a libvirt connection.

    ``connection`` is a libvirt connection or a callable returning one (so a
    reconnecting :class:`~vtpm_driver.virt.connection.Hypervisor` can be used).
    Errors are mapped by :func:`~vtpm_driver.virt.connection.to_vtpm_error`.
    """

    def __init__(self, connection_or_factory: Any) -> None:
        self._conn = connection_or_factory

    def __repr__(self) -> str:
        return "LibvirtSecretStore()"

    @property
    def conn(self) -> libvirt.virConnect:
        return self._conn() if callable(self._conn) else self._conn

    def find(self, instance_uuid: str) -> str | None:
        found = lookup_vtpm_secret_by_instance(self.conn, instance_uuid)
        return None if found is None else found.UUIDString()

    def define(self, secret_uuid: str, instance_uuid: str, passphrase: str, *,
               persistent: bool) -> None:
        define_vtpm_secret(self.conn, secret_uuid, instance_uuid, passphrase,
                           persistent=persistent)

    def undefine(self, secret_uuid: str) -> bool:
        return undefine_vtpm_secret(self.conn, secret_uuid)
