"""SPEC C1-C3: vtpm_driver.model.hostcheck with captured domain capabilities and a fake probe."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from tests.fakes.probe import FakeProbe, domcaps
from vtpm_driver import conf as vtpm_conf
from vtpm_driver import exception
from vtpm_driver.model import hostcheck

T12 = "COMPUTE_SECURITY_TPM_1_2"
T20 = "COMPUTE_SECURITY_TPM_2_0"
TIS = "COMPUTE_SECURITY_TPM_TIS"
CRB = "COMPUTE_SECURITY_TPM_CRB"
SUSER = "COMPUTE_SECURITY_TPM_SECRET_SECURITY_USER"
SHOST = "COMPUTE_SECURITY_TPM_SECRET_SECURITY_HOST"
SDEPL = "COMPUTE_SECURITY_TPM_SECRET_SECURITY_DEPLOYMENT"
BANKS = ("CUSTOM_VTPM_PCR_BANK_SHA1", "CUSTOM_VTPM_PCR_BANK_SHA256",
         "CUSTOM_VTPM_PCR_BANK_SHA384", "CUSTOM_VTPM_PCR_BANK_SHA512")
ALL = (T12, T20, TIS, CRB, SUSER, SHOST, SDEPL, *BANKS)


def fixture(name: str) -> str:
    return domcaps(name)


REAL = "domcaps-qemu-host.xml"


_MADE: list = []


def make_conf(enabled: bool = True, **libvirt_opts):
    conf = vtpm_conf.new_conf()
    _MADE.append(conf)
    conf.set_override("swtpm_enabled", enabled, group="libvirt")
    conf.set_override("virt_type", libvirt_opts.pop("virt_type", "qemu"), group="libvirt")
    for name, value in libvirt_opts.items():
        conf.set_override(name, value, group="libvirt")
    return conf


@pytest.fixture(autouse=True)
def _reset_overrides():
    """Drop overrides after each test.

    conf.new_conf() shares option state between ConfigOpts objects (see
    test_new_conf_is_isolated), so an override would leak into later tests.
    """
    yield
    while _MADE:
        _MADE.pop().reset()


def test_new_conf_is_isolated():
    """An override on one conf must not change another (fails: shared OptGroup._opts).

    vtpm_driver.conf registers the module-level OptGroup objects; oslo.config's
    register_group keeps a shallow copy whose _opts dict (where overrides and
    defaults live) is shared by every ConfigOpts that new_conf() returns.
    """
    first = vtpm_conf.new_conf()
    second = vtpm_conf.new_conf()
    try:
        first.set_override("swtpm_user", "someone-else", group="libvirt")
        assert second.libvirt.swtpm_user == "tss"
    finally:
        first.reset()


def only(*true: str) -> dict[str, bool]:
    return {trait: trait in true for trait in ALL}


# -- parse_domain_capabilities ----------------------------------------------

@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (REAL, hostcheck.TPMCapabilities(
            True, frozenset({"tpm-tis", "tpm-crb"}),
            frozenset({"passthrough", "emulator", "external"}), frozenset({"1.2", "2.0"}))),
        ("domcaps-no-tpm.xml", hostcheck.TPMCapabilities()),
        ("domcaps-tpm-unsupported.xml", hostcheck.TPMCapabilities()),
        ("domcaps-no-emulator.xml", hostcheck.TPMCapabilities(
            True, frozenset({"tpm-tis", "tpm-crb"}), frozenset({"passthrough"}),
            frozenset({"1.2", "2.0"}))),
        ("domcaps-no-versions.xml", hostcheck.TPMCapabilities(
            True, frozenset({"tpm-tis", "tpm-crb"}),
            frozenset({"passthrough", "emulator", "external"}), frozenset())),
        ("domcaps-only-2.0.xml", hostcheck.TPMCapabilities(
            True, frozenset({"tpm-tis", "tpm-crb"}),
            frozenset({"passthrough", "emulator", "external"}), frozenset({"2.0"}))),
        ("domcaps-only-tis.xml", hostcheck.TPMCapabilities(
            True, frozenset({"tpm-tis"}),
            frozenset({"passthrough", "emulator", "external"}), frozenset({"1.2", "2.0"}))),
    ],
)
def test_parse_fixtures(name, expected):
    assert hostcheck.parse_domain_capabilities(fixture(name)) == expected


@pytest.mark.parametrize(
    ("xml", "expected"),
    [
        ("<domainCapabilities/>", hostcheck.TPMCapabilities()),
        ("<domainCapabilities><devices/></domainCapabilities>", hostcheck.TPMCapabilities()),
        ("<domainCapabilities><devices><tpm/></devices></domainCapabilities>",
         hostcheck.TPMCapabilities()),
        ("<domainCapabilities><devices><tpm supported='YES'/></devices></domainCapabilities>",
         hostcheck.TPMCapabilities()),
        ("<domainCapabilities><devices><tpm supported='yes'>"
         "<enum name='model'><value> tpm-tis </value><value/></enum>"
         "<enum name='backendVersion'/></tpm></devices></domainCapabilities>",
         hostcheck.TPMCapabilities(True, frozenset({"tpm-tis"}))),
        # a <tpm> outside <devices> is not the device capability
        ("<domainCapabilities><tpm supported='yes'/></domainCapabilities>",
         hostcheck.TPMCapabilities()),
    ],
)
def test_parse_edge_cases(xml, expected):
    assert hostcheck.parse_domain_capabilities(xml) == expected


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("", "not XML"),
        ("<domainCapabilities>", "not XML"),
        ("not xml at all", "not XML"),
        ("<capabilities/>", "<capabilities> where <domainCapabilities> was expected"),
    ],
)
def test_parse_refuses_garbage(xml, message):
    with pytest.raises(exception.VirtError, match=message):
        hostcheck.parse_domain_capabilities(xml)


def test_parse_does_not_resolve_external_entities(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("tpm-crb-from-a-file")
    xml = (
        f'<!DOCTYPE d [<!ENTITY e SYSTEM "file://{secret}">]>'
        "<domainCapabilities><devices><tpm supported='yes'>"
        "<enum name='model'><value>&e;</value><value>tpm-tis</value></enum>"
        "</tpm></devices></domainCapabilities>"
    )
    caps = hostcheck.parse_domain_capabilities(xml)
    assert "tpm-crb-from-a-file" not in caps.models
    assert "tpm-tis" in caps.models


# -- C1: swtpm disabled ----------------------------------------------------

def test_c1_disabled_reports_every_trait_false():
    probe = FakeProbe()
    report = hostcheck.check_host(make_conf(enabled=False), probe)
    assert report.supported is False
    assert report.traits == only()
    assert set(report.traits) == set(ALL)
    assert report.problems == [
        "[libvirt] swtpm_enabled is False: set it to True to offer emulated TPMs"
    ]
    assert report.versions == {"libvirt": "9.0.0", "qemu": "7.2.0", "swtpm": "0.7.1"}
    assert probe.asked_virt_types == []  # libvirt's TPM support is irrelevant then


def test_c1_disabled_even_on_a_host_with_nothing():
    probe = FakeProbe(xml=fixture("domcaps-no-tpm.xml"), binaries=set(), users=set(),
                      groups=set())
    report = hostcheck.check_host(make_conf(enabled=False, virt_type="lxc"), probe)
    assert report.traits == only()
    assert len(report.problems) == 1


# -- C2: enabled, refusals ---------------------------------------------------

def test_c2_sound_host_is_supported():
    probe = FakeProbe()
    report = hostcheck.check_host(make_conf(), probe)
    assert report == hostcheck.HostReport(
        supported=True, traits=only(*ALL), problems=[],
        versions={"libvirt": "9.0.0", "qemu": "7.2.0", "swtpm": "0.7.1"},
        secure_boot=True, windows11_missing=(),
    )
    assert report.windows11
    assert probe.asked_virt_types == ["qemu"]


# -- Windows 11: UEFI Secure Boot firmware and a TPM 2.0 ----------------------------------

def test_a_host_without_secure_boot_firmware_cannot_boot_windows_11():
    """The captured default machine's capabilities: no efi firmware (no OVMF)."""
    report = hostcheck.check_host(make_conf(), FakeProbe(q35_xml=domcaps()))
    assert report.supported and not report.secure_boot and not report.windows11
    (missing,) = report.windows11_missing
    assert "no q35 loader with secure='yes'" in missing and "ovmf" in missing


def test_a_host_with_only_tpm_1_2_cannot_boot_windows_11():
    report = hostcheck.check_host(make_conf(), FakeProbe(xml=domcaps("domcaps-only-tis.xml")))
    assert report.secure_boot
    assert report.traits[T20] is True  # only-tis still has both versions
    report = hostcheck.check_host(make_conf(), FakeProbe(
        xml=domcaps("domcaps-only-2.0.xml").replace("<value>2.0</value>",
                                                     "<value>1.2</value>")))
    assert report.windows11_missing == ("a TPM 2.0 (libvirt offers no TPM 2.0 emulator backend)",)


def test_a_q35_query_libvirt_refuses_is_named_not_raised():
    report = hostcheck.check_host(make_conf(), FakeProbe(
        q35_xml=exception.VirtError("unknown machine 'q35'")))
    assert report.supported and not report.windows11
    assert "unknown machine 'q35'" in report.windows11_missing[0]


def test_an_unsupported_host_reports_no_windows_11():
    report = hostcheck.check_host(make_conf(), FakeProbe(binaries=set()))
    assert not report.supported and not report.windows11


@pytest.mark.parametrize(("name", "offers"), [
    ("domcaps-q35-secure-boot.xml", True), ("domcaps-qemu-host.xml", False)])
def test_offers_secure_boot_reads_firmware_and_secure_loader(name, offers):
    assert hostcheck.offers_secure_boot(domcaps(name)) is offers


@pytest.mark.parametrize("virt_type", ["kvm", "qemu"])
def test_c2_domain_capabilities_asked_for_the_configured_virt_type(virt_type):
    probe = FakeProbe()
    hostcheck.check_host(make_conf(virt_type=virt_type), probe)
    assert probe.asked_virt_types == [virt_type]


@pytest.mark.parametrize("virt_type", ["lxc", "parallels"])
def test_c2_virt_type_must_be_kvm_or_qemu(virt_type):
    probe = FakeProbe()
    report = hostcheck.check_host(make_conf(virt_type=virt_type), probe)
    assert report.supported is False
    assert report.traits == only()
    assert report.problems == [
        f"[libvirt] virt_type is '{virt_type}': emulated TPMs need 'kvm' or 'qemu'; "
        "change virt_type or set swtpm_enabled = False"
    ]
    assert probe.asked_virt_types == []


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("domcaps-no-tpm.xml",
         "libvirt at qemu:///system (virt_type qemu) does not support TPM devices: its domain "
         "capabilities lack <tpm supported='yes'>; install a QEMU build with TPM support and "
         "restart libvirtd"),
        ("domcaps-tpm-unsupported.xml",
         "libvirt at qemu:///system (virt_type qemu) does not support TPM devices: its domain "
         "capabilities lack <tpm supported='yes'>; install a QEMU build with TPM support and "
         "restart libvirtd"),
        ("domcaps-no-emulator.xml",
         "libvirt at qemu:///system (virt_type qemu) does not offer the 'emulator' TPM backend "
         "(offers: passthrough); install swtpm and restart libvirtd so that it detects it"),
    ],
)
def test_c2_libvirt_must_offer_the_emulator_backend(name, problem):
    report = hostcheck.check_host(make_conf(), FakeProbe(xml=fixture(name)))
    assert report.supported is False
    assert report.traits == only()
    assert report.problems == [problem]


def test_c2_problem_names_the_configured_uri():
    conf = make_conf(connection_uri="qemu:///session")
    report = hostcheck.check_host(conf, FakeProbe(xml=fixture("domcaps-no-tpm.xml")))
    assert report.problems[0].startswith("libvirt at qemu:///session (virt_type qemu)")


@pytest.mark.parametrize("missing", ["swtpm", "swtpm_setup", "swtpm_ioctl"])
def test_c2_each_swtpm_binary_is_required(missing):
    probe = FakeProbe(binaries={"swtpm", "swtpm_setup", "swtpm_ioctl"} - {missing})
    report = hostcheck.check_host(make_conf(), probe)
    assert report.supported is False
    assert report.traits == only()
    assert report.problems == [
        f"{missing} not found in PATH: install the swtpm and swtpm-tools packages"
    ]


def test_c2_swtpm_user_must_exist():
    report = hostcheck.check_host(make_conf(swtpm_user="swtpm-nobody"), FakeProbe())
    assert report.traits == only()
    assert report.problems == [
        "[libvirt] swtpm_user 'swtpm-nobody' does not exist on this host: create it or set "
        "swtpm_user to the user libvirt runs swtpm as (swtpm_user in /etc/libvirt/qemu.conf, "
        "'tss' by default)"
    ]


def test_c2_swtpm_group_must_exist():
    report = hostcheck.check_host(make_conf(swtpm_group="swtpm-none"), FakeProbe())
    assert report.traits == only()
    assert report.problems == [
        "[libvirt] swtpm_group 'swtpm-none' does not exist on this host: create it or set "
        "swtpm_group to the group libvirt runs swtpm as (swtpm_group in /etc/libvirt/qemu.conf, "
        "'tss' by default)"
    ]


def test_c2_user_and_group_are_looked_up_by_their_configured_names():
    probe = FakeProbe(users={"swtpm"}, groups={"swtpm"})
    conf = make_conf(swtpm_user="swtpm", swtpm_group="swtpm")
    assert hostcheck.check_host(conf, probe).supported is True


def test_c2_every_problem_is_reported_at_once():
    probe = FakeProbe(xml=fixture("domcaps-no-emulator.xml"), binaries={"swtpm"},
                      users=set(), groups=set())
    conf = make_conf(supported_tpm_secret_security=["user", "bogus"])
    report = hostcheck.check_host(conf, probe)
    assert report.supported is False
    assert report.traits == only()
    text = "\n".join(report.problems)
    assert len(report.problems) == 6
    for needle in ("'emulator' TPM backend", "swtpm_setup not found", "swtpm_ioctl not found",
                   "swtpm_user 'tss'", "swtpm_group 'tss'", "unknown value 'bogus'"):
        assert needle in text


def test_c2_libvirt_refusing_the_query_is_a_problem_not_a_crash():
    probe = FakeProbe(xml=exception.VirtError("libvirt at qemu:///system refused to report "
                                              "domain capabilities: KVM is not supported"))
    report = hostcheck.check_host(make_conf(virt_type="kvm"), probe)
    assert report.supported is False
    assert report.problems == [
        "libvirt at qemu:///system cannot report domain capabilities for virt_type kvm: "
        "libvirt at qemu:///system refused to report domain capabilities: KVM is not supported"
    ]


def test_c2_unparsable_capabilities_are_a_problem():
    report = hostcheck.check_host(make_conf(), FakeProbe(xml="<oops"))
    assert report.supported is False
    assert "cannot report domain capabilities" in report.problems[0]
    assert "not XML" in report.problems[0]


@pytest.mark.parametrize("where", ["versions", "domain_capabilities"])
def test_unreachable_libvirt_raises(where):
    error = exception.HypervisorUnavailable("cannot connect to libvirt at qemu:///x: gone")
    probe = FakeProbe(**({"version_info": error} if where == "versions" else {"xml": error}))
    with pytest.raises(exception.HypervisorUnavailable, match="qemu:///x"):
        hostcheck.check_host(make_conf(), probe)


# -- C3: traits --------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "traits"),
    [
        (REAL, only(*ALL)),
        ("domcaps-no-versions.xml", only(*ALL)),  # libvirt < 8.6: both versions assumed
        ("domcaps-only-2.0.xml", only(T20, TIS, CRB, SUSER, SHOST, SDEPL, *BANKS)),
        ("domcaps-only-tis.xml", only(T12, T20, TIS, SUSER, SHOST, SDEPL, *BANKS)),
    ],
)
def test_c3_traits_follow_domain_capabilities(name, traits):
    report = hostcheck.check_host(make_conf(), FakeProbe(xml=fixture(name)))
    assert report.supported is True
    assert report.traits == traits


@pytest.mark.parametrize(
    ("modes", "true"),
    [
        (["user", "host", "deployment"], (SUSER, SHOST, SDEPL)),
        (["user"], (SUSER,)),
        (["host"], (SHOST,)),
        (["deployment", "host"], (SHOST, SDEPL)),
        ([], ()),
    ],
)
def test_c3_secret_security_traits_follow_config(modes, true):
    report = hostcheck.check_host(make_conf(supported_tpm_secret_security=modes), FakeProbe())
    assert report.supported is True
    assert report.traits == only(T12, T20, TIS, CRB, *BANKS, *true)


@pytest.mark.parametrize("bad", ["User", "admin", "hosts", ""])
def test_c3_unknown_secret_security_is_a_problem(bad):
    report = hostcheck.check_host(
        make_conf(supported_tpm_secret_security=["user", bad]), FakeProbe()
    )
    assert report.supported is False
    assert report.traits == only()
    assert report.problems == [
        f"[libvirt] supported_tpm_secret_security contains unknown value {bad!r}: "
        "allowed values are user, host, deployment"
    ]


def test_c3_unsupported_traits_are_reported_false_not_omitted():
    report = hostcheck.check_host(make_conf(supported_tpm_secret_security=["user"]),
                             FakeProbe(xml=fixture("domcaps-only-tis.xml")))
    assert set(report.traits) == set(ALL)
    assert report.traits[CRB] is False and report.traits[SHOST] is False


def test_tpm_traits_ignores_unknown_models_and_versions():
    caps = hostcheck.TPMCapabilities(True, frozenset({"tpm-spapr"}), frozenset({"emulator"}),
                                frozenset({"3.0"}))
    assert hostcheck.tpm_traits(caps, []) == only()


# -- LibvirtHostProbe, with a fake libvirt connection ------------------------


# -- PCR banks ---------------------------------------------------------------

@pytest.mark.parametrize(("libvirt", "implemented", "true"), [
    ("9.0.0", {"sha1", "sha256", "sha384", "sha512"}, BANKS),
    ("8.0.0", {"sha256", "sha384"}, (BANKS[1], BANKS[2])),   # only what swtpm implements
    ("7.10.0", {"sha1", "sha256", "sha384", "sha512"}, ()),  # libvirt cannot set banks yet
    ("9.0.0", set(), ()),                                    # swtpm could not be asked
])
def test_bank_traits_need_libvirt_and_swtpm(libvirt, implemented, true):
    probe = FakeProbe(banks=frozenset(implemented),
                      version_info={"libvirt": libvirt, "qemu": "7.2.0"})
    report = hostcheck.check_host(make_conf(), probe)
    assert report.supported is True
    assert report.traits == only(T12, T20, TIS, CRB, SUSER, SHOST, SDEPL, *true)


@pytest.mark.parametrize("version", [None, "", "nine", "9.x"])
def test_bank_traits_need_a_readable_libvirt_version(version):
    assert hostcheck.activatable_banks(version, {"sha256"}) == frozenset()


def test_bank_traits_ignore_banks_we_have_no_trait_for():
    assert hostcheck.activatable_banks("9.0.0", {"sm3_256", "sha256"}) == {"sha256"}


# -- the deployment's EK CA ([vtpm] ek_ca_certificate, ek_ca_key) ------------------------

def _ca_files(tmp_path, **kwargs):
    from tests.unit.virt.test_manufacture import make_ca
    ca = make_ca(tmp_path / "ca", **kwargs)
    return {ca.certificate: Path(ca.certificate).read_bytes(), ca.key: Path(ca.key).read_bytes()
            }, ca


def _with_ca(conf, ca):
    conf.set_override("ek_ca_certificate", ca.certificate, group="vtpm")
    conf.set_override("ek_ca_key", ca.key, group="vtpm")
    return conf


def test_a_usable_ek_ca_is_no_problem(tmp_path):
    files, ca = _ca_files(tmp_path)
    report = hostcheck.check_host(_with_ca(make_conf(), ca), FakeProbe(files=files))
    assert report.supported and report.problems == []


def test_an_unreadable_or_half_configured_ek_ca_is_a_problem(tmp_path):
    files, ca = _ca_files(tmp_path)
    report = hostcheck.check_host(_with_ca(make_conf(), ca), FakeProbe())  # no files
    assert not report.supported
    assert report.problems == [f"[vtpm] EK CA: cannot read {ca.certificate}: "
                               "No such file or directory"]
    conf = make_conf()
    conf.set_override("ek_ca_key", ca.key, group="vtpm")
    assert hostcheck.check_host(conf, FakeProbe(files=files)).problems == [
        "[vtpm] ek_ca_certificate and ek_ca_key go together: set both or neither"]
    report = hostcheck.check_host(_with_ca(make_conf(), ca), FakeProbe(
        files=files, binaries={"swtpm", "swtpm_setup", "swtpm_ioctl"}))
    assert report.problems[0].startswith("swtpm_localca not found in PATH")


def test_ek_ca_problems_names_each_defect(tmp_path):
    files, ca = _ca_files(tmp_path)
    cert, key = files[ca.certificate], files[ca.key]
    other_files, other = _ca_files(tmp_path / "other")
    assert hostcheck.ek_ca_problems(cert, other_files[other.key]) == [
        "[vtpm] ek_ca_key is not the key of ek_ca_certificate"]
    assert hostcheck.ek_ca_problems(b"junk", key) == [
        "[vtpm] ek_ca_certificate is not a PEM certificate"]
    assert hostcheck.ek_ca_problems(cert, b"junk") == [
        "[vtpm] ek_ca_key is not an unencrypted PEM private key"]
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=60)
    (expired,) = hostcheck.ek_ca_problems(cert, key, now=later)
    assert expired.startswith("[vtpm] ek_ca_certificate is valid only from")
    leaf_files, leaf = _ca_files(tmp_path / "leaf", ca=False, ski=False)
    assert hostcheck.ek_ca_problems(leaf_files[leaf.certificate], leaf_files[leaf.key]) == [
        "[vtpm] ek_ca_certificate is not a CA certificate (basicConstraints CA:TRUE)",
        "[vtpm] ek_ca_certificate has no subjectKeyIdentifier, which swtpm_localca copies "
        "into each certificate as its authority key id"]
