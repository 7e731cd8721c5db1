"""What every operation needs on one host: the guest, its XML and record, the secret store.

:class:`Guests` is shared by :mod:`~vtpm_driver.ops.lifecycle`,
:mod:`~vtpm_driver.ops.power` and :mod:`~vtpm_driver.ops.resize`. It holds the
configuration, the libvirt connection (through
:class:`~vtpm_driver.virt.connection.Hypervisor`), the key manager and the
libvirt secret store, and does the steps they all take: find the domain, build
its XML with the ``<tpm>`` and the server record, and start it with the
passphrase in libvirt only for the moment swtpm reads it
(:func:`vtpm_driver.ops.secrets.secret_for_start`).

It makes no decision: what a flavor asks for is :mod:`vtpm_driver.model.rules`,
what a host offers is :func:`vtpm_driver.model.hostcheck.check_host`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from vtpm_driver import exception, faults
from vtpm_driver.keymgr import KeyManagerAPI
from vtpm_driver.keymgr.api import EKCertificateStore
from vtpm_driver.model import custody, firmware
from vtpm_driver.model.hostcheck import HostReport
from vtpm_driver.model.request import VTPMConfig
from vtpm_driver.model.server import (
    EK_CERT_KEY,
    EK_FINGERPRINT_KEY,
    EK_PEM_KEY,
    image_properties,
    recorded_secret,
    server_label,
)
from vtpm_driver.ops import custody as ops_custody
from vtpm_driver.ops import journal
from vtpm_driver.ops import secrets as ops_secrets
from vtpm_driver.virt import domain, guest, record, secret, state
from vtpm_driver.virt import manufacture as virt_manufacture

LOG = logging.getLogger(__name__)

#: Nova's ``[DEFAULT] shutdown_retry_interval``: press the power button again this often.
DEFAULT_RETRY_INTERVAL = 10.0


class Guests:
    """This host's guests as the operations see them.

    ``hypervisor`` has a ``conn`` attribute (a libvirt connection, reopened
    when lost); ``host_report`` returns what this host offers (cached by the
    driver); ``state_base`` answers where this host's swtpm state directories
    are, as seen from here (the driver's
    :attr:`~vtpm_driver.standalone.driver.VTPMDriver.state_base`; asked each time, so an
    unknown directory fails only the step that needs it); ``secrets`` defaults
    to the libvirt secrets of that connection.
    """

    def __init__(self, conf: cfg.ConfigOpts, hypervisor: Any, key_manager: KeyManagerAPI,
                 host_report: Callable[[], HostReport], *,
                 state_base: Callable[[], str],
                 secrets: ops_secrets.SecretStore | None = None) -> None:
        self.conf = conf
        self._state_base = state_base
        self.hypervisor = hypervisor
        self.keymgr = key_manager
        self._host_report = host_report
        self.secrets = secrets or secret.LibvirtSecretStore(lambda: self.hypervisor.conn)

    def __repr__(self) -> str:
        return f"Guests(hypervisor={self.hypervisor!r})"

    @property
    def conn(self) -> Any:
        return self.hypervisor.conn

    @property
    def state_base(self) -> str:
        """This host's swtpm state directory (the driver's ``[vtpm] swtpm_state_dir``)."""
        return self._state_base()

    # -- checks -------------------------------------------------------------

    def check_host_offers(self, cfg: VTPMConfig, instance: Any) -> None:
        """Refuse a vTPM whose traits this host lacks (the scheduler's job in Nova).

        :raises InvalidConfiguration: names the missing traits and the host's problems.
        """
        report = self._host_report()
        offered = {trait for trait, ok in report.traits.items() if ok}
        missing = sorted(cfg.traits - offered)
        if not missing:
            return
        why = f" ({'; '.join(report.problems)})" if report.problems else ""
        raise exception.InvalidConfiguration(
            f"server {server_label(instance)} asks for a vTPM (version {cfg.version}, "
            f"model {cfg.model}, secret security {cfg.secret_security}) that this host does "
            f"not offer: missing trait(s) {', '.join(missing)}{why}"
        )

    def lookup(self, instance: Any) -> Any:
        """The server's domain (by UUID). :raises InstanceNotFound:"""
        return guest.lookup(self.conn, instance.uuid)

    def find(self, instance: Any) -> Any | None:
        """The server's domain, or None when it is gone."""
        try:
            return self.lookup(instance)
        except exception.InstanceNotFound:
            return None

    # -- XML and record -----------------------------------------------------

    def base_xml(self, instance: Any) -> str:
        """The guest without ``<tpm>`` or record; checks name, sizes and boot files.

        :raises VirtError: bad name, sizes or boot files.
        :raises InvalidFirmwareRequest: the flavor or image ask for firmware
            that cannot be given (:func:`vtpm_driver.model.firmware.get_firmware`).
        """
        image = instance.image_meta
        virt_type = self.conf.libvirt.virt_type
        fw = firmware.get_firmware(instance.flavor.extra_specs, image_properties(image))
        return domain.guest_xml(
            instance.name, instance.uuid, instance.flavor.vcpus, instance.flavor.memory_mb,
            console_log=instance.console_log, kernel=getattr(image, "kernel", None),
            initrd=getattr(image, "initrd", None), cmdline=getattr(image, "cmdline", None),
            disk=getattr(image, "disk", None),
            virt_type=virt_type if virt_type in domain.VIRT_TYPES else "kvm",
            uefi=fw.uefi,
            secure_boot={firmware.REQUIRED: True, firmware.DISABLED: False}.get(fw.secure_boot)
            if fw.uefi else None,
        )

    def domain_xml(self, instance: Any, cfg: VTPMConfig | None, base: str | None = None) -> str:
        """The full domain XML: guest, ``<tpm>`` (when asked for), server record.

        :raises VirtError: bad name, sizes or boot files.
        :raises InvalidVTPMConfig: a vTPM without a recorded secret UUID.
        """
        xml = base if base is not None else self.base_xml(instance)
        if cfg is not None:
            xml = domain.add_tpm(xml, cfg.version, cfg.model, recorded_secret(instance),
                                 cfg.pcr_banks)
        return record.set_server_record(xml, instance)

    def define(self, instance: Any, cfg: VTPMConfig | None) -> Any:
        """(Re)define the server's domain with its current flavor and record; idempotent."""
        return guest.define(self.conn, self.domain_xml(instance, cfg))

    def update_record(self, dom: Any, instance: Any) -> None:
        """Store the instance's current flavor and system metadata in its domain."""
        record.update_domain_record(dom, instance)

    def journal(self, dom: Any, instance: Any, intent: journal.Intent | None) -> None:
        """Write (``intent``) or clear (None) the server's journal entry, in its record.

        Written BEFORE the step it announces (:mod:`vtpm_driver.ops.journal`).
        ``dom`` None (no domain yet or any more): only the instance changes.

        :raises VirtError: the record could not be stored.
        """
        if intent is None:
            if not journal.clear(instance.system_metadata):
                return
        else:
            journal.write(instance.system_metadata, intent)
        if dom is not None:
            self.update_record(dom, instance)

    # -- console log --------------------------------------------------------

    def ensure_console_log(self, instance: Any) -> None:
        """Default ``console_log`` to ``[vtpm] console_log_dir/<uuid>.log``.

        :raises InvalidConfiguration: the directory cannot be created.
        """
        if getattr(instance, "console_log", None):
            return
        directory = self.conf.vtpm.console_log_dir
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise exception.InvalidConfiguration(
                f"cannot create [vtpm] console_log_dir {directory!r}: {exc.strerror}"
            ) from None
        instance.console_log = os.path.join(directory, f"{instance.uuid}.log")

    def owns_console_log(self, instance: Any) -> bool:
        """Whether the console log is ours (in ``[vtpm] console_log_dir``), not a file the
        user chose with ``--console-log`` (which is only ever appended to)."""
        path = getattr(instance, "console_log", None)
        if not path:
            return False
        directory = os.path.realpath(self.conf.vtpm.console_log_dir)
        return os.path.dirname(os.path.realpath(path)) == directory

    def _unlink_own_console_log(self, instance: Any) -> OSError | None:
        """Remove the console log if it is ours; the error that kept it, else None."""
        if not self.owns_console_log(instance):
            return None  # a file the user chose: theirs to keep
        try:
            os.unlink(instance.console_log)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return exc
        return None

    def _reset_console(self, instance: Any) -> None:
        """Start each boot with an empty console log, if the log is ours.

        A file the user chose is never removed or truncated (issue 13 item 4):
        the console is appended to it (``append='on'``,
        :func:`vtpm_driver.virt.domain.guest_xml`).

        :raises VirtError: our log exists and cannot be removed.
        """
        exc = self._unlink_own_console_log(instance)
        if exc is not None:
            raise exception.VirtError(
                f"cannot remove old console log {instance.console_log!r} of server "
                f"{server_label(instance)}: {exc.strerror}"
            ) from None

    def remove_own_console_log(self, instance: Any) -> None:
        """Delete the console log if it is in ``[vtpm] console_log_dir`` (ours); idempotent."""
        exc = self._unlink_own_console_log(instance)
        if exc is not None:
            LOG.warning("Could not remove console log %s: %s", instance.console_log,
                        exc.strerror, instance_uuid=instance.uuid)

    def check_no_domain(self, instance: Any, refused: str) -> None:
        """Refuse to bring ``instance`` here while a domain of its UUID or name is here.

        :raises InstanceExists: ``refused`` (e.g. "cannot move server X to host
            'h2'") and the clashing name or UUID.
        """
        for key in (instance.uuid, instance.name):
            try:
                guest.lookup(self.conn, key)
            except exception.InstanceNotFound:
                continue
            raise exception.InstanceExists(
                f"{refused}: a domain named or numbered {key!r} is there already")

    # -- starting -------------------------------------------------------------

    def prepare_start(self, context: Any, instance: Any, cfg: VTPMConfig | None, *,
                      create: bool = False,
                      absent_ok: bool = False) -> ops_secrets.StartSecret | None:
        """Custody, then :func:`vtpm_driver.ops.secrets.prepare_start` on this host (F2, F5).

        Call it BEFORE the guest is touched: every start of a guest with a
        vTPM on this host asks here first. The live TPM state must be the
        server's current copy (:func:`vtpm_driver.ops.custody.check_live`);
        then it is stamped (a state with no generation, of a server created
        before custody, is current once) and the record updated, if it
        changed, in the domain. ``absent_ok``: no state here is not a missing TPM:
        this operation makes a new one (a create, ``rebuild --reset-tpm``, a
        resize to another TPM) or restores it (a revert's checked backup).

        :raises StaleTPMState: the state here is older (or newer) than the
            record's generation, or missing; nothing was touched.
        """
        if cfg is not None:
            self.check_custody(instance, absent_ok=absent_ok)
            self.stamp(instance)
        return ops_secrets.prepare_start(context, instance, cfg, self.keymgr, self.secrets,
                                         create=create)

    # -- manufacture (vtpm_driver.virt.manufacture) ---------------------------------------

    @property
    def ek_ca(self) -> virt_manufacture.CertificateAuthority | None:
        """The deployment's EK CA (``[vtpm] ek_ca_certificate`` and ``ek_ca_key``), or None."""
        return virt_manufacture.certificate_authority(self.conf.vtpm)

    def retire_ek_certificate(self, context: Any, instance: Any, cfg: VTPMConfig | None
                              ) -> None:
        """The server is getting a new TPM: withdraw the EK certificate published for
        the old one (key manager copy and record); idempotent.

        :raises VTPMError: the key manager refused or failed (the record keeps it).
        """
        if instance.system_metadata.get(EK_CERT_KEY) and isinstance(self.keymgr,
                                                                     EKCertificateStore):
            self.keymgr.delete_ek_certificate(
                context, instance, cfg.secret_security if cfg is not None else None)
        for key in (EK_CERT_KEY, EK_FINGERPRINT_KEY, EK_PEM_KEY):
            instance.system_metadata.pop(key, None)

    def manufacture(self, context: Any, instance: Any, cfg: VTPMConfig | None,
                    start: ops_secrets.StartSecret | None) -> None:
        """Make a new TPM here before its first start, and publish its EK certificate.

        Only with a deployment EK CA configured (:attr:`ek_ca`): otherwise
        libvirt manufactures at the start, as it always did. Nothing to do
        without a vTPM, without the passphrase at hand, or when the server
        already has TPM state here (never touched). A certificate published
        for an earlier TPM of the server is withdrawn first. The new one (PEM,
        then the CA's) goes to the key manager as the owner's and, with its
        fingerprint, into the record; the caller defines the domain after.
        On failure the new state is removed again and the error raised.

        :raises VTPMError: swtpm_setup or the key manager failed.
        """
        ca = self.ek_ca
        if (ca is None or cfg is None or start is None or start.passphrase is None
                or state.has_tpm_state(self.state_base, instance.uuid)):
            return
        self.retire_ek_certificate(context, instance, cfg)
        cert = virt_manufacture.manufacture(
            self.state_base, instance.uuid, instance.name, cfg.version, start.passphrase,
            pcr_banks=cfg.pcr_banks, ca=ca, swtpm_user=self.conf.libvirt.swtpm_user,
            swtpm_group=self.conf.libvirt.swtpm_group)
        try:
            self.stamp(instance)
            if cert is not None:
                instance.system_metadata[EK_FINGERPRINT_KEY] = cert.fingerprint
                instance.system_metadata[EK_PEM_KEY] = cert.pem
                if isinstance(self.keymgr, EKCertificateStore):
                    self.keymgr.store_ek_certificate(context, instance, cfg.secret_security,
                                                     cert.pem + cert.chain_pem)
        except BaseException:
            instance.system_metadata.pop(EK_FINGERPRINT_KEY, None)
            instance.system_metadata.pop(EK_PEM_KEY, None)
            state.remove_tpm(self.state_base, instance.uuid)
            raise

    # -- custody (vtpm_driver.model.custody) -----------------------------------------------

    def check_custody(self, instance: Any, *, doing: str = "start",
                      record: int | None = None, absent_ok: bool = False) -> None:
        """:func:`vtpm_driver.ops.custody.check_live` on this host. :raises StaleTPMState:"""
        ops_custody.check_live(instance, self.state_base, host=None, doing=doing,
                               allow_stale=bool(self.conf.vtpm.allow_stale_tpm_state),
                               record=record, absent_ok=absent_ok)

    def stamp(self, instance: Any, dom: Any = None) -> None:
        """The live state and the record agree (:func:`vtpm_driver.ops.custody.stamp_live`).

        After a hand-over (the record advanced in ``instance`` and stored by a
        define) the state gets the new generation; a record that changed here
        is stored in ``dom`` (found when not given). Idempotent.
        """
        before = custody.recorded(instance)
        ops_custody.stamp_live(instance, self.state_base)
        if custody.recorded(instance) != before:
            dom = dom if dom is not None else self.find(instance)
            if dom is not None:
                self.update_record(dom, instance)

    def launch(self, dom: Any, instance: Any, start: ops_secrets.StartSecret | None, *,
               fresh_boot: bool = True) -> None:
        """Start a defined domain, with the libvirt secret only around the start (E3).

        ``fresh_boot`` empties the console log first (not for a resume, which
        continues the same boot).

        :raises VirtError: the start failed or the guest did not run in time.
        """
        if fresh_boot:
            self._reset_console(instance)
        # A start that defines a secret announces it: if this process dies before the
        # secret is undefined again, the next operation (or audit) removes it.
        announce = (start is not None and start.passphrase is not None
                    and journal.read(instance.system_metadata,
                                     server_label(instance)) is None)
        if announce:
            self.journal(dom, instance, journal.begin(journal.START))
        try:
            with ops_secrets.secret_for_start(self.secrets, instance, start):
                faults.point("launch.secret_defined")
                guest.start(dom)
                faults.point("launch.started")
            guest.wait_until_running(dom, float(self.conf.vtpm.guest_start_timeout))
        except Exception:
            if announce:
                self._clear_start_journal(dom, instance, start)
            raise
        if announce:
            self.journal(dom, instance, None)

    def _clear_start_journal(self, dom: Any, instance: Any,
                             start: ops_secrets.StartSecret | None) -> None:
        """After a failed start: clear its entry once no secret of it is left defined."""
        try:
            if start is not None and not start.persistent and self.secrets.find(instance.uuid):
                return  # the next operation removes it
            self.journal(dom, instance, None)
        except exception.VTPMError as exc:
            LOG.warning("Could not clear the journal entry of a failed start: %s", exc,
                        instance_uuid=instance.uuid)
