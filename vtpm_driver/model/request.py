"""What a server asks for: flavor extra specs + image properties -> vTPM config.

Pure functions, no I/O (SPEC sections A and B). Every problem in the request is
reported here, at request time, as an :class:`~vtpm_driver.exception.InvalidVTPMConfig`
(or its subclass :class:`~vtpm_driver.exception.FlavorImageConflict`), so a bad
flavor is refused before anything is created rather than leaving a server in
ERROR. Any mapping is accepted as input; odd values never crash.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from vtpm_driver import exception

VERSION_1_2 = "1.2"
VERSION_2_0 = "2.0"
VERSIONS = (VERSION_1_2, VERSION_2_0)

MODEL_TIS = "tpm-tis"
MODEL_CRB = "tpm-crb"
MODELS = (MODEL_TIS, MODEL_CRB)
DEFAULT_MODEL = MODEL_TIS

SECRET_USER = "user"
SECRET_HOST = "host"
SECRET_DEPLOYMENT = "deployment"
SECRET_SECURITY_MODES = (SECRET_USER, SECRET_HOST, SECRET_DEPLOYMENT)
DEFAULT_SECRET_SECURITY = SECRET_USER

FLAVOR_VERSION_KEY = "hw:tpm_version"
FLAVOR_MODEL_KEY = "hw:tpm_model"
FLAVOR_SECRET_SECURITY_KEY = "hw:tpm_secret_security"
IMAGE_VERSION_KEY = "hw_tpm_version"
IMAGE_MODEL_KEY = "hw_tpm_model"
#: Active PCR banks of a TPM 2.0 (libvirt's ``<active_pcr_banks>``), comma-separated.
FLAVOR_PCR_BANKS_KEY = "hw:tpm_pcr_banks"
IMAGE_PCR_BANKS_KEY = "hw_tpm_pcr_banks"
PCR_BANKS = ("sha1", "sha256", "sha384", "sha512")

# Placement traits (os-traits names).
TRAIT_TPM_1_2 = "COMPUTE_SECURITY_TPM_1_2"
TRAIT_TPM_2_0 = "COMPUTE_SECURITY_TPM_2_0"
TRAIT_TPM_TIS = "COMPUTE_SECURITY_TPM_TIS"
TRAIT_TPM_CRB = "COMPUTE_SECURITY_TPM_CRB"
TRAIT_SECRET_USER = "COMPUTE_SECURITY_TPM_SECRET_SECURITY_USER"
TRAIT_SECRET_HOST = "COMPUTE_SECURITY_TPM_SECRET_SECURITY_HOST"
TRAIT_SECRET_DEPLOYMENT = "COMPUTE_SECURITY_TPM_SECRET_SECURITY_DEPLOYMENT"

VERSION_TRAITS = {VERSION_1_2: TRAIT_TPM_1_2, VERSION_2_0: TRAIT_TPM_2_0}
MODEL_TRAITS = {MODEL_TIS: TRAIT_TPM_TIS, MODEL_CRB: TRAIT_TPM_CRB}
SECRET_SECURITY_TRAITS = {
    SECRET_USER: TRAIT_SECRET_USER,
    SECRET_HOST: TRAIT_SECRET_HOST,
    SECRET_DEPLOYMENT: TRAIT_SECRET_DEPLOYMENT,
}
#: Nova's seven, all from os-traits.
STANDARD_TRAITS = (
    *VERSION_TRAITS.values(),
    *MODEL_TRAITS.values(),
    *SECRET_SECURITY_TRAITS.values(),
)
#: os-traits has no PCR bank traits: one custom trait per bank a host can activate.
PCR_BANK_TRAITS = {bank: f"CUSTOM_VTPM_PCR_BANK_{bank.upper()}" for bank in PCR_BANKS}
ALL_TRAITS = (*STANDARD_TRAITS, *PCR_BANK_TRAITS.values())

_VALID_COMBINATIONS = frozenset(
    {(VERSION_1_2, MODEL_TIS), (VERSION_2_0, MODEL_TIS), (VERSION_2_0, MODEL_CRB)}
)

_MAX_SHOWN = 64  # characters of an offending value quoted in a message


class Unparsed(enum.Enum):
    """A request not parsed yet (``None`` is a parsed request for no vTPM)."""

    UNPARSED = "unparsed"


#: Passed on where a caller has not parsed the request: the callee parses it.
#: A caller that has passes its :class:`VTPMConfig` (or None) on instead, so one
#: create parses flavor + image once.
UNPARSED = Unparsed.UNPARSED


@dataclasses.dataclass(frozen=True)
class VTPMConfig:
    """A valid vTPM request: one of the three (version, model) pairs + secret mode."""

    version: str
    model: str = DEFAULT_MODEL
    secret_security: str = DEFAULT_SECRET_SECURITY
    #: The active PCR banks asked for, in :data:`PCR_BANKS` order; empty: swtpm's default.
    pcr_banks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.version, self.model) not in _VALID_COMBINATIONS:
            raise exception.InvalidVTPMConfig(
                f"invalid vTPM (version, model) ({show(self.version)}, {show(self.model)}): "
                "valid pairs are (1.2, tpm-tis), (2.0, tpm-tis), (2.0, tpm-crb)"
            )
        if self.secret_security not in SECRET_SECURITY_MODES:
            raise exception.InvalidVTPMConfig(
                f"invalid secret security {show(self.secret_security)}: allowed values are "
                f"{', '.join(SECRET_SECURITY_MODES)}"
            )
        if self.pcr_banks and (self.version != VERSION_2_0 or self.pcr_banks != tuple(
                bank for bank in PCR_BANKS if bank in self.pcr_banks)):
            raise exception.InvalidVTPMConfig(
                f"invalid PCR banks {show(self.pcr_banks)} for TPM {self.version}: a TPM 2.0 "
                f"takes distinct banks of {', '.join(PCR_BANKS)}, in that order")

    @property
    def traits(self) -> frozenset[str]:
        """The placement traits a host needs to run this vTPM."""
        return frozenset(
            {
                VERSION_TRAITS[self.version],
                MODEL_TRAITS[self.model],
                SECRET_SECURITY_TRAITS[self.secret_security],
                *(PCR_BANK_TRAITS[bank] for bank in self.pcr_banks),
            }
        )


def show(value: object) -> str:
    """Quote a user-supplied value for an error message, bounded in length."""
    try:
        text = repr(value)
    except Exception:  # a >4300-digit int, deep nesting, a hostile __repr__
        text = f"<{type(value).__name__}>"
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return text


def _as_mapping(value: object, what: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise exception.InvalidVTPMConfig(
            f"{what} must be a mapping of strings, got {type(value).__name__}"
        )
    return value


def _lookup(mapping: Mapping, key: str) -> object | None:
    """The value of ``key``; an empty string counts as unset (SPEC A2, as in Nova,
    which takes ``flavor_value or image_value``)."""
    try:
        value = mapping.get(key)
    except Exception as exc:  # a hostile Mapping; never let it escape untyped
        raise exception.InvalidVTPMConfig(f"cannot read {key!r}: {type(exc).__name__}") from None
    if isinstance(value, str) and value == "":
        return None
    return value


def _check_string(key: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise exception.InvalidVTPMConfig(
            f"invalid {key}={show(value)}: must be a string ({type(value).__name__} given); "
            f"allowed values are {', '.join(allowed)}"
        )
    if value not in allowed:
        raise exception.InvalidVTPMConfig(
            f"invalid {key}={show(value)}: allowed values are {', '.join(allowed)}"
        )
    return value


def _differ(a: object, b: object) -> bool:
    try:
        return bool(a != b)
    except Exception:  # a hostile __eq__/__ne__ or __bool__: treat as different
        return True


def _unique(
    flavor: Mapping, flavor_key: str, image: Mapping, image_key: str, allowed: tuple[str, ...]
) -> tuple[str, str] | None:
    """(key, value) from flavor or image; both set and different is a conflict."""
    from_flavor = _lookup(flavor, flavor_key)
    from_image = _lookup(image, image_key)
    if from_flavor is not None and from_image is not None and _differ(from_flavor, from_image):
        raise exception.FlavorImageConflict(
            f"flavor {flavor_key}={show(from_flavor)} conflicts with image "
            f"{image_key}={show(from_image)}: set one, or set both to the same value"
        )
    if from_flavor is not None:
        return flavor_key, _check_string(flavor_key, from_flavor, allowed)
    if from_image is not None:
        return image_key, _check_string(image_key, from_image, allowed)
    return None


def pcr_banks(key: str, value: object) -> tuple[str, ...]:
    """The banks a ``hw:tpm_pcr_banks`` / ``hw_tpm_pcr_banks`` value names, in
    :data:`PCR_BANKS` order (so two spellings of the same set compare equal).

    :raises InvalidVTPMConfig: not a string, an empty or unknown name, a repeated one.
    """
    if not isinstance(value, str):
        raise exception.InvalidVTPMConfig(
            f"invalid {key}={show(value)}: must be a comma-separated string of "
            f"{', '.join(PCR_BANKS)}")
    names = [name.strip().lower() for name in value.split(",")]
    unknown = [name for name in names if name not in PCR_BANKS]
    if unknown:
        raise exception.InvalidVTPMConfig(
            f"invalid {key}={show(value)}: {show(unknown[0])} is no PCR bank; allowed are "
            f"{', '.join(PCR_BANKS)}, comma-separated")
    if len(set(names)) != len(names):
        raise exception.InvalidVTPMConfig(f"invalid {key}={show(value)}: a bank is named twice")
    return tuple(bank for bank in PCR_BANKS if bank in names)


def _banks(flavor: Mapping, image: Mapping, version_key: str, version: str
           ) -> tuple[str, ...]:
    """The PCR banks flavor or image ask for (flavor and image must agree as sets)."""
    found = [(key, pcr_banks(key, value)) for key, value in (
        (FLAVOR_PCR_BANKS_KEY, _lookup(flavor, FLAVOR_PCR_BANKS_KEY)),
        (IMAGE_PCR_BANKS_KEY, _lookup(image, IMAGE_PCR_BANKS_KEY))) if value is not None]
    if len(found) == 2 and found[0][1] != found[1][1]:
        raise exception.FlavorImageConflict(
            f"flavor {FLAVOR_PCR_BANKS_KEY}={show(_lookup(flavor, FLAVOR_PCR_BANKS_KEY))} "
            f"conflicts with image {IMAGE_PCR_BANKS_KEY}="
            f"{show(_lookup(image, IMAGE_PCR_BANKS_KEY))}: set one, or both to the same banks")
    if not found:
        return ()
    key, banks = found[0]
    if version != VERSION_2_0:
        raise exception.InvalidVTPMConfig(
            f"invalid {key} with {version_key}={version!r}: a TPM {version} has one fixed "
            f"SHA-1 bank; PCR banks need TPM version {VERSION_2_0}")
    return banks


def get_vtpm_config(
    flavor_extra_specs: Mapping[str, str] | None,
    image_properties: Mapping[str, str] | None,
) -> VTPMConfig | None:
    """The vTPM this request asks for, or None when it asks for none.

    :raises InvalidVTPMConfig: a value is not allowed, or the model does not
        fit the version.
    :raises FlavorImageConflict: flavor and image disagree.
    """
    flavor = _as_mapping(flavor_extra_specs, "flavor extra specs")
    image = _as_mapping(image_properties, "image properties")

    found_version = _unique(flavor, FLAVOR_VERSION_KEY, image, IMAGE_VERSION_KEY, VERSIONS)
    if found_version is None:
        return None
    version_key, version = found_version

    found_model = _unique(flavor, FLAVOR_MODEL_KEY, image, IMAGE_MODEL_KEY, MODELS)
    model = found_model[1] if found_model else DEFAULT_MODEL
    if found_model and (version, model) not in _VALID_COMBINATIONS:
        raise exception.InvalidVTPMConfig(
            f"invalid {found_model[0]}={model!r} with {version_key}={version!r}: "
            f"{MODEL_CRB} needs TPM version {VERSION_2_0}; valid (version, model) pairs "
            "are (1.2, tpm-tis), (2.0, tpm-tis), (2.0, tpm-crb)"
        )

    return VTPMConfig(version=version, model=model, secret_security=secret_security(flavor),
                      pcr_banks=_banks(flavor, image, version_key, version))


def check_mode(value: object, key: str = FLAVOR_SECRET_SECURITY_KEY) -> str:
    """``value`` if it is a secret security mode (``key`` names it in the message).

    :raises InvalidVTPMConfig: it is not.
    """
    return _check_string(key, value, SECRET_SECURITY_MODES)


def secret_security(flavor_extra_specs: Mapping[str, str] | None, *,
                    strict: bool = True) -> str:
    """THE secret-mode rule: the mode a flavor's extra specs give (SPEC A5).

    ``hw:tpm_secret_security``; unset or empty is :data:`DEFAULT_SECRET_SECURITY`.
    Only the flavor sets it (no image property does). ``strict``: an invalid
    value raises, as a request does; otherwise it falls back to the default,
    so that deleting or cleaning up a server is never blocked by its flavor.
    :func:`get_vtpm_config` and every reader of a server's mode go through here.

    :raises InvalidVTPMConfig: ``strict`` and the value is not a known mode.
    """
    try:
        found = _lookup(_as_mapping(flavor_extra_specs, "flavor extra specs"),
                        FLAVOR_SECRET_SECURITY_KEY)
        return DEFAULT_SECRET_SECURITY if found is None else check_mode(found)
    except exception.InvalidVTPMConfig:
        if strict:
            raise
        return DEFAULT_SECRET_SECURITY


def required_traits(
    flavor_extra_specs: Mapping[str, str] | None,
    image_properties: Mapping[str, str] | None,
) -> frozenset[str]:
    """Placement traits a host must have for this request (empty: no vTPM)."""
    config = get_vtpm_config(flavor_extra_specs, image_properties)
    return config.traits if config else frozenset()
