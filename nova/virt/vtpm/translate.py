"""Translation between Nova's objects and the ``vtpm_driver`` package.

Nova hands the driver its own ``RequestContext``, ``Flavor``, ``ImageMeta``
(whose ``properties`` is an ``ImageMetaProps`` object, not a mapping) and
expects its own exception types back. Everything here is a pure mapping:
no decision about vTPMs is taken in this module: Nova decides whether a guest
has one (:func:`vtpm_config`), and :mod:`vtpm_driver.model.request`,
:mod:`vtpm_driver.model.rules`, :mod:`vtpm_driver.model.hostcheck`, :mod:`vtpm_driver.ops` and
:mod:`vtpm_driver.virt` the rest.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from lxml import etree
from nova import exception as nova_exception
from nova.virt import hardware
from nova.virt.libvirt import config as vconfig

from vtpm_driver import exception
from vtpm_driver.keymgr import context as vtpm_context
from vtpm_driver.model import request, rules
from vtpm_driver.virt import domain

# A domain document just big enough for domain.add_tpm to build the <tpm> in.
_SKELETON = "<domain><devices/></domain>"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=True)


def request_context(context: Any) -> vtpm_context.RequestContext:
    """Our request context from Nova's (same attribute names; roles as a tuple)."""
    return vtpm_context.RequestContext(
        user_id=getattr(context, "user_id", None) or "",
        project_id=getattr(context, "project_id", None) or "",
        auth_token=getattr(context, "auth_token", None),
        roles=tuple(getattr(context, "roles", None) or ()),
        service_catalog=list(getattr(context, "service_catalog", None) or []),
        user_name=getattr(context, "user_name", None),
        project_name=getattr(context, "project_name", None),
    )


def vtpm_config(flavor: Any, image_meta: Any) -> request.VTPMConfig | None:
    """The vTPM a guest of this flavor and image gets, or None.

    Nova decides whether there is one and which (version, model): its
    ``nova.virt.hardware.get_vtpm_constraint``, looked up at call time, is
    the answer its libvirt driver acts on everywhere else (``_create_guest``,
    migrations), so the shim never disagrees with it. The secret mode is the
    flavor's, checked by :func:`vtpm_driver.model.rules.secret_security`; the
    PCR banks are the flavor's ``hw:tpm_pcr_banks`` (Nova keeps no image
    property it does not know, so ``hw_tpm_pcr_banks`` never reaches a compute).

    :raises nova.exception.FlavorImageConflict: flavor and image disagree.
    :raises nova.exception.Invalid: an invalid value or combination.
    """
    found = hardware.get_vtpm_constraint(flavor, image_meta)
    if found is None:
        return None
    with nova_errors():
        banks = (flavor.extra_specs or {}).get(request.FLAVOR_PCR_BANKS_KEY)
        return request.VTPMConfig(
            version=found.version, model=found.model,
            secret_security=rules.secret_security(flavor),
            pcr_banks=() if banks is None else request.pcr_banks(
                request.FLAVOR_PCR_BANKS_KEY, banks))


def secret_modes(instance: Any) -> tuple[str | None, ...]:
    """The secret mode of each flavor the instance may run with, None where that
    flavor gives no vTPM: ``instance.flavor`` and, while a resize or cold
    migration is not confirmed or reverted, ``old_flavor`` and ``new_flavor``
    (each with the instance's image, as :func:`vtpm_config` reads them).

    For :func:`vtpm_driver.model.rules.left_after_start`: the instance needs
    ``flavor`` and ``system_metadata`` loaded (Nova's ``expected_attrs``), else
    Nova's object lazy-loads them.

    :raises nova.exception.FlavorImageConflict: a flavor and the image disagree.
    :raises nova.exception.Invalid: an invalid value or combination.
    """
    image_meta = instance.image_meta
    flavors = (instance.flavor, instance.old_flavor, instance.new_flavor)
    configs = [vtpm_config(flavor, image_meta) for flavor in flavors if flavor is not None]
    return tuple(None if config is None else config.secret_security for config in configs)


def has_vtpm(flavor: Any, image_meta: Any) -> bool:
    """Whether a guest of this flavor and image gets a vTPM: Nova's question, as Nova asks it.

    ``nova.virt.hardware.get_vtpm_constraint`` (looked up at call time), whose
    answer Nova's driver only tests for truth before it reads or creates the
    secret (``spawn``, ``_create_guest``). The version and model are read
    where the ``<tpm>`` is built (:func:`vtpm_config`).

    :raises nova.exception.FlavorImageConflict: flavor and image disagree.
    :raises nova.exception.Invalid: an invalid value.
    """
    return bool(hardware.get_vtpm_constraint(flavor, image_meta))


def rescue_boots_foreign_files(instance: Any, image_meta: Any, libvirt_conf: Any) -> bool:
    """Whether Nova's rescue boots other boot files than the server's own. Pure.

    As Nova's libvirt driver picks them: the rescue image (``image_meta.id``;
    without one ``[libvirt] rescue_image_id``, else the server's image) and
    ``[libvirt] rescue_kernel_id``/``rescue_ramdisk_id``. The server's own
    image is ``instance.image_ref`` or the base image Nova's compute manager
    rescues with by default (``system_metadata['image_base_image_ref']``).
    """
    sysmeta = getattr(instance, "system_metadata", None) or {}
    image_ref = getattr(instance, "image_ref", None)
    own = {image_ref, sysmeta.get("image_base_image_ref")} - {None, ""}
    is_set = getattr(image_meta, "obj_attr_is_set", None)
    image_id = image_meta.id if is_set is not None and is_set("id") else None
    image_id = image_id or libvirt_conf.rescue_image_id or image_ref
    kernel, ramdisk = libvirt_conf.rescue_kernel_id, libvirt_conf.rescue_ramdisk_id
    return (image_id not in own
            or bool(kernel and kernel != getattr(instance, "kernel_id", None))
            or bool(ramdisk and ramdisk != getattr(instance, "ramdisk_id", None)))


def tpm_element(config: request.VTPMConfig, secret_uuid: str | None) -> etree._Element:
    """The ``<tpm>`` element exactly as :func:`vtpm_driver.virt.domain.add_tpm` writes it.

    :raises nova.exception.Invalid: no or an invalid secret UUID (no vTPM
        without encryption), or a version/model pair libvirt would refuse.
    """
    with nova_errors():
        xml = domain.add_tpm(_SKELETON, config.version, config.model, secret_uuid,
                             config.pcr_banks)
    return etree.fromstring(xml.encode(), _PARSER).find("devices/tpm")


class GuestVTPM(vconfig.LibvirtConfigGuestVTPM):
    """Nova's vTPM device config whose XML is the element our package builds.

    Subclassing Nova's class keeps ``isinstance`` checks in Nova working;
    :meth:`format_dom` returns :func:`tpm_element` so the domain Nova defines
    carries the same ``<tpm>`` as a standalone vtpm-driver server.
    """

    def __init__(self, config: request.VTPMConfig, secret_uuid: str | None) -> None:
        self._element = tpm_element(config, secret_uuid)
        super().__init__(hardware.VTPMConfig(config.version, config.model), secret_uuid)

    def format_dom(self) -> etree._Element:
        return copy.deepcopy(self._element)


# Nova's own start-up refusals (nova.virt.libvirt.driver._check_vtpm_support),
# in Nova's order, each with a mark of the problem of ours it stands for.
_NOVA_REFUSALS = (
    (("[libvirt] virt_type is ",),
     "vTPM support requires '[libvirt] virt_type' of 'qemu' or 'kvm'; found '{virt_type}'."),
    (("does not support TPM devices", "TPM backend", "cannot report domain capabilities"),
     "vTPM support is configured but it's not supported by libvirt."),
    (("[libvirt] swtpm_user ",),
     "The user configured in '[libvirt] swtpm_user' does not exist on this host; "
     "expected '{swtpm_user}'."),
    (("[libvirt] swtpm_group ",),
     "The group configured in '[libvirt] swtpm_group' does not exist on this host; "
     "expected '{swtpm_group}'."),
)


def startup_refusal(problems: list[str], conf: Any) -> str:
    """nova-compute's refusal to start: Nova's own sentence first, then every problem.

    Nova stops at the first failed check; :func:`vtpm_driver.model.hostcheck.check_host`
    lists them all. The message starts with the sentence Nova's driver would
    have logged (for operators' log searches and Nova's tests), when one of
    the problems is one Nova checks, then lists ours.
    """
    first = ""
    for marks, sentence in _NOVA_REFUSALS:
        if any(mark in problem for problem in problems for mark in marks):
            opts = conf.libvirt
            first = sentence.format(virt_type=opts.virt_type, swtpm_user=opts.swtpm_user,
                                    swtpm_group=opts.swtpm_group) + " "
            break
    return (f"{first}[libvirt] swtpm_enabled is True but this host cannot provide emulated "
            f"TPMs: {'; '.join(problems)}. Fix the above, or set [libvirt] swtpm_enabled = False")


def to_nova_exception(exc: exception.VTPMError) -> Exception:
    """The Nova exception that Nova's own code raises in the same situation.

    Messages are ours (they name the key, the value and what to do) and never
    hold secrets, so they are passed on unchanged.
    """
    message = str(exc)
    if isinstance(exc, exception.FlavorImageConflict):
        return nova_exception.FlavorImageConflict(message=message)
    if isinstance(exc, exception.InvalidVTPMConfig):
        return nova_exception.Invalid(message=message)
    if isinstance(exc, exception.InvalidConfiguration):
        return nova_exception.InvalidConfiguration(message=message)
    if isinstance(exc, exception.VTPMSecretForbidden):
        return nova_exception.VTPMSecretForbidden(message=message)
    if isinstance(exc, exception.VTPMSecretNotFound):
        return nova_exception.VTPMSecretNotFound(message=message)
    if isinstance(exc, exception.KeyManagerUnavailable):
        return nova_exception.KeyManagerError(reason=message)
    if isinstance(exc, exception.OperationNotSupportedForVTPM):
        return nova_exception.OperationNotSupportedForVTPM(message=message)
    if isinstance(exc, exception.HypervisorUnavailable):
        return nova_exception.HypervisorUnavailable(message=message)
    if isinstance(exc, exception.InstanceNotFound):
        return nova_exception.InstanceNotFound(message=message)
    return nova_exception.InternalError(message=message)


@contextlib.contextmanager
def nova_errors() -> Iterator[None]:
    """Re-raise any ``VTPMError`` from the body as the matching Nova exception."""
    try:
        yield
    except exception.VTPMError as exc:
        raise to_nova_exception(exc) from exc
