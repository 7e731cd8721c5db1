"""`vtpm-driver request check` / `host check`: output shape, exit codes, one-line errors."""

from __future__ import annotations

import json
import logging
import re

import pytest

from tests.fakes.probe import FakeProbe, domcaps
from vtpm_driver import exception
from vtpm_driver.cli import main as cli_main
from vtpm_driver.model import request

NO_TPM = domcaps("domcaps-no-tpm.xml")


def run(capsys, *argv: str, **kwargs) -> tuple[int, str, str]:
    rc = cli_main.main(list(argv), **kwargs)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def _no_default_config(monkeypatch, tmp_path):
    """Never read the machine's /etc/vtpm-driver/vtpm-driver.conf in unit tests."""
    monkeypatch.setattr(cli_main, "DEFAULT_CONFIG_FILES", (str(tmp_path / "absent.conf"),))


# -- request check ------------------------------------------------------------

@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--flavor-property", "hw:tpm_version=2.0"],
         {"vtpm": True, "version": "2.0", "model": "tpm-tis", "secret_security": "user",
          "required_traits": ["COMPUTE_SECURITY_TPM_2_0",
                              "COMPUTE_SECURITY_TPM_SECRET_SECURITY_USER",
                              "COMPUTE_SECURITY_TPM_TIS"]}),
        (["--image-property", "hw_tpm_version=2.0", "--image-property", "hw_tpm_model=tpm-crb",
          "--flavor-property", "hw:tpm_secret_security=deployment"],
         {"vtpm": True, "version": "2.0", "model": "tpm-crb", "secret_security": "deployment",
          "required_traits": ["COMPUTE_SECURITY_TPM_2_0", "COMPUTE_SECURITY_TPM_CRB",
                              "COMPUTE_SECURITY_TPM_SECRET_SECURITY_DEPLOYMENT"]}),
        (["--flavor-property", "hw:tpm_version=1.2", "--flavor-property",
          "hw:tpm_secret_security=host", "--image-property", "hw_tpm_version=1.2"],
         {"vtpm": True, "version": "1.2", "model": "tpm-tis", "secret_security": "host",
          "required_traits": ["COMPUTE_SECURITY_TPM_1_2",
                              "COMPUTE_SECURITY_TPM_SECRET_SECURITY_HOST",
                              "COMPUTE_SECURITY_TPM_TIS"]}),
        ([], {"vtpm": False, "version": None, "model": None, "secret_security": None,
              "required_traits": []}),
        (["--flavor-property", "hw:tpm_model=tpm-crb", "--flavor-property", "hw:cpu_policy=x"],
         {"vtpm": False, "version": None, "model": None, "secret_security": None,
          "required_traits": []}),
    ],
)
def test_request_check_json(capsys, args, expected):
    rc, out, err = run(capsys, "request", "check", *args, "-f", "json")
    assert (rc, err) == (0, "")
    result = json.loads(out)
    assert {key: result[key] for key in expected} == expected
    assert list(result) == ["vtpm", "version", "model", "secret_security", "pcr_banks",
                            "required_traits", "firmware", "secure_boot", "windows11",
                            "windows11_missing"]
    assert (result["firmware"], result["secure_boot"]) == ("bios", "disabled")
    assert result["windows11"] is False  # none of these has UEFI and Secure Boot


@pytest.mark.parametrize(("args", "banks", "firmware", "secure_boot"), [
    (["--flavor-property", "hw:tpm_version=2.0", "--flavor-property",
      "hw:tpm_pcr_banks=sha512,sha1", "--image-property", "hw_firmware_type=uefi"],
     ["sha1", "sha512"], "uefi", "disabled"),
    (["--image-property", "hw_firmware_type=UEFI", "--flavor-property", "os:secure_boot=required"],
     [], "uefi", "required"),
    (["--image-property", "hw_firmware_type=bios", "--image-property", "os_secure_boot=optional"],
     [], "bios", "disabled"),  # optional Secure Boot is none on BIOS
])
def test_request_check_shows_banks_and_firmware(capsys, args, banks, firmware, secure_boot):
    rc, out, err = run(capsys, "request", "check", *args, "-f", "json")
    assert (rc, err) == (0, "")
    result = json.loads(out)
    assert (result["pcr_banks"], result["firmware"], result["secure_boot"]) == (
        banks, firmware, secure_boot)


@pytest.mark.parametrize(("args", "message"), [
    (["--image-property", "hw_firmware_type=coreboot"],
     "invalid image hw_firmware_type='coreboot': allowed values are bios, uefi"),
    (["--flavor-property", "os:secure_boot=maybe"],
     "invalid flavor os:secure_boot='maybe': allowed values are required, optional, disabled"),
    (["--flavor-property", "os:secure_boot=required", "--image-property",
      "os_secure_boot=disabled"],
     "flavor os:secure_boot='required' conflicts with image os_secure_boot='disabled'"),
    (["--image-property", "os_secure_boot=required"],
     "os_secure_boot=required needs UEFI firmware: set image hw_firmware_type=uefi "
     "(it is 'bios')"),
])
def test_request_check_refuses_firmware_that_cannot_be_given(capsys, args, message):
    rc, out, err = run(capsys, "request", "check", *args)
    assert (rc, out) == (1, "")
    assert message in err


WINDOWS_11 = ["--image-property", "os_distro=windows", "--image-property", "os_version=11"]
FOR_WINDOWS_11 = [("--flavor-property", "hw:tpm_version=2.0"),
                  ("--flavor-property", "os:secure_boot=required"),
                  ("--image-property", "hw_firmware_type=uefi")]


def options(pairs):
    return [word for pair in pairs for word in pair]


def test_request_check_says_a_request_windows_11_accepts(capsys):
    rc, out, err = run(capsys, "request", "check", *WINDOWS_11, *options(FOR_WINDOWS_11),
                       "--image-property", "hw_tpm_model=tpm-crb", "-f", "json")
    assert (rc, err) == (0, "")
    assert (json.loads(out)["windows11"], json.loads(out)["windows11_missing"]) == (True, [])


@pytest.mark.parametrize(("drop", "named"), [
    ("hw:tpm_version=2.0", "a TPM 2.0 (flavor hw:tpm_version=2.0)"),
    ("hw_firmware_type=uefi", "UEFI firmware (image hw_firmware_type=uefi)"),
    ("os:secure_boot=required", "Secure Boot (flavor os:secure_boot=required or image "
                                "os_secure_boot=required)"),
])
def test_request_check_refuses_a_windows_11_image_naming_what_is_missing(capsys, drop, named):
    args = options(pair for pair in FOR_WINDOWS_11 if pair[1] != drop)
    rc, out, err = run(capsys, "request", "check", *WINDOWS_11, *args, "-f", "json")
    assert (rc, out) == (1, "")
    assert err == ("vtpm-driver: error: the image is Windows 11 (os_distro=windows, "
                   f"os_version='11'), which needs {named}\n")


def test_request_check_json_matches_spec(capsys):
    flavor = {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb", "hw:tpm_secret_security": "host"}
    args = [a for k, v in flavor.items() for a in ("--flavor-property", f"{k}={v}")]
    rc, out, _ = run(capsys, "request", "check", *args, "-f", "json")
    assert rc == 0
    assert set(json.loads(out)["required_traits"]) == request.required_traits(flavor, {})


def test_request_check_table_by_default(capsys):
    rc, out, err = run(capsys, "request", "check", "--flavor-property", "hw:tpm_version=1.2")
    assert (rc, err) == (0, "")
    assert "| Field" in out and "| Value" in out
    assert re.search(r"\| vtpm +\| True", out)
    assert "COMPUTE_SECURITY_TPM_1_2" in out


def test_request_check_value_format(capsys):
    rc, out, _ = run(capsys, "request", "check", "--image-property", "hw_tpm_version=2.0",
                     "-f", "value", "-c", "model")
    assert (rc, out) == (0, "tpm-tis\n")


def test_request_check_last_repeated_key_wins(capsys):
    rc, out, _ = run(capsys, "request", "check", "--flavor-property", "hw:tpm_version=1.2",
                     "--flavor-property", "hw:tpm_version=2.0", "-f", "json")
    assert rc == 0 and json.loads(out)["version"] == "2.0"


def test_request_check_value_may_contain_equals(capsys):
    rc, out, err = run(capsys, "request", "check", "--flavor-property", "hw:tpm_version=2.0=x")
    assert (rc, out) == (1, "")
    assert err == ("vtpm-driver: error: invalid hw:tpm_version='2.0=x': "
                   "allowed values are 1.2, 2.0\n")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--flavor-property", "hw:tpm_version=3.0"],
         "vtpm-driver: error: invalid hw:tpm_version='3.0': allowed values are 1.2, 2.0"),
        (["--image-property", "hw_tpm_version=v2"],
         "vtpm-driver: error: invalid hw_tpm_version='v2': allowed values are 1.2, 2.0"),
        (["--flavor-property", "hw:tpm_version=1.2", "--flavor-property",
          "hw:tpm_model=tpm-crb"],
         "vtpm-driver: error: invalid hw:tpm_model='tpm-crb' with hw:tpm_version='1.2': "
         "tpm-crb needs TPM version 2.0; valid (version, model) pairs are (1.2, tpm-tis), "
         "(2.0, tpm-tis), (2.0, tpm-crb)"),
        (["--flavor-property", "hw:tpm_version=2.0", "--flavor-property",
          "hw:tpm_secret_security=nobody"],
         "vtpm-driver: error: invalid hw:tpm_secret_security='nobody': "
         "allowed values are user, host, deployment"),
    ],
)
def test_request_check_invalid_is_exit_1_one_line(capsys, args, line):
    rc, out, err = run(capsys, "request", "check", *args, "-f", "json")
    assert rc == 1
    assert out == ""
    assert err.splitlines() == [line]


def test_request_check_conflict_names_both_keys(capsys):
    rc, out, err = run(capsys, "request", "check", "--flavor-property", "hw:tpm_version=2.0",
                       "--image-property", "hw_tpm_version=1.2", "-f", "json")
    assert (rc, out) == (1, "")
    assert err.splitlines() == [
        "vtpm-driver: error: flavor hw:tpm_version='2.0' conflicts with image "
        "hw_tpm_version='1.2': set one, or set both to the same value"
    ]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--flavor-property", "hw:tpm_version"],
         "argument --flavor-property: expected KEY=VALUE, got 'hw:tpm_version'"),
        (["--image-property", "=2.0"],
         "argument --image-property: expected KEY=VALUE, got '=2.0'"),
        (["--flavor-property"], "argument --flavor-property: expected one argument"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["-f", "xml"], "argument -f/--format: invalid choice: 'xml'"),
    ],
)
def test_request_check_usage_errors_exit_2(capsys, args, needle):
    rc, out, err = run(capsys, "request", "check", *args)
    assert rc == 2
    assert out == ""
    assert needle in err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(capsys):
    rc, _, err = run(capsys, "--debug", "request", "check", "--flavor-property",
                     "hw:tpm_version=9")
    assert rc == 1
    assert "Traceback" in err and "InvalidVTPMConfig" in err


def test_missing_command_is_a_usage_error(capsys):
    rc, out, err = run(capsys)
    assert (rc, out) == (2, "")
    assert err.splitlines() == [
        "vtpm-driver: error: a command is required; run 'vtpm-driver help' to list them"
    ]


def test_unknown_command_is_a_usage_error(capsys):
    rc, out, err = run(capsys, "hots", "check", "-f", "json")
    assert (rc, out) == (2, "")
    assert err.splitlines() == [
        "vtpm-driver: error: 'hots check' is not a vtpm-driver command; "
        "did you mean 'host check'? (run 'vtpm-driver help' to list them)"
    ]


def test_help_lists_the_commands(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    assert "request check" in out and "host check" in out and "--config-file" in out


def test_command_help_documents_exit_status(capsys):
    rc, out, _ = run(capsys, "host", "check", "--help")
    assert rc == 0
    assert "Exit status" in out


def test_main_leaves_no_logging_handlers_behind(capsys):
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    run(capsys, "request", "check", "--flavor-property", "hw:tpm_version=9")
    run(capsys, "-v", "-v", "request", "check")
    assert (list(root.handlers), root.level) == before


# -- host check -------------------------------------------------------------

class Factory:
    """probe_factory recording the conf it was given."""

    def __init__(self, probe: FakeProbe) -> None:
        self.probe = probe
        self.confs: list = []

    def __call__(self, conf):
        self.confs.append(conf)
        return self.probe


def write_conf(tmp_path, text: str) -> str:
    path = tmp_path / "vtpm-driver.conf"
    path.write_text(text)
    return str(path)


ENABLED = "[libvirt]\nswtpm_enabled = True\nvirt_type = qemu\n"


def test_host_check_json_supported(capsys, tmp_path):
    factory = Factory(FakeProbe())
    rc, out, err = run(capsys, "--config-file", write_conf(tmp_path, ENABLED),
                       "host", "check", "-f", "json", probe_factory=factory)
    assert (rc, err) == (0, "")
    result = json.loads(out)
    assert list(result) == ["supported", "traits", "problems", "versions", "secure_boot",
                            "windows11", "windows11_missing"]
    assert result == {
        "supported": True,
        "traits": dict.fromkeys(request.ALL_TRAITS, True),
        "problems": [],
        "versions": {"libvirt": "9.0.0", "qemu": "7.2.0", "swtpm": "0.7.1"},
        "secure_boot": True, "windows11": True, "windows11_missing": [],
    }
    assert factory.probe.closed
    assert factory.confs[0].libvirt.swtpm_enabled is True


def test_host_check_unsupported_is_still_exit_0(capsys, tmp_path):
    rc, out, err = run(capsys, "--config-file", write_conf(tmp_path, ENABLED),
                       "host", "check", "-f", "json", probe_factory=Factory(FakeProbe(xml=NO_TPM)))
    assert (rc, err) == (0, "")
    result = json.loads(out)
    assert result["supported"] is False
    assert result["traits"] == dict.fromkeys(request.ALL_TRAITS, False)
    assert len(result["problems"]) == 1 and "<tpm supported='yes'>" in result["problems"][0]
    assert result["windows11"] is False


def test_host_check_default_config_is_swtpm_disabled(capsys):
    rc, out, _ = run(capsys, "host", "check", "-f", "json",
                     probe_factory=Factory(FakeProbe()))
    assert rc == 0
    result = json.loads(out)
    assert result["supported"] is False
    assert result["traits"] == dict.fromkeys(request.ALL_TRAITS, False)
    assert result["problems"] == [
        "[libvirt] swtpm_enabled is False: set it to True to offer emulated TPMs"
    ]


def test_host_check_reads_the_default_config_file_when_present(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli_main, "DEFAULT_CONFIG_FILES", (write_conf(tmp_path, ENABLED),))
    rc, out, _ = run(capsys, "host", "check", "-f", "json",
                     probe_factory=Factory(FakeProbe()))
    assert rc == 0 and json.loads(out)["supported"] is True


def test_host_check_config_file_overrides_the_default(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli_main, "DEFAULT_CONFIG_FILES", (write_conf(tmp_path, ENABLED),))
    other = tmp_path / "other.conf"
    other.write_text("[libvirt]\nswtpm_enabled = False\n")
    rc, out, _ = run(capsys, "--config-file", str(other), "host", "check", "-f", "json",
                     probe_factory=Factory(FakeProbe()))
    assert rc == 0 and json.loads(out)["supported"] is False


def test_host_check_table(capsys, tmp_path):
    rc, out, err = run(capsys, "--config-file", write_conf(tmp_path, ENABLED),
                       "host", "check", probe_factory=Factory(FakeProbe()))
    assert (rc, err) == (0, "")
    assert "COMPUTE_SECURITY_TPM_CRB=True" in out
    assert "libvirt=9.0.0" in out


def test_host_check_unreachable_libvirt_exit_1_one_line(capsys, tmp_path):
    probe = FakeProbe(version_info=exception.HypervisorUnavailable(
        "cannot connect to libvirt at qemu+unix:///system?socket=/nonexistent: "
        "Failed to connect socket to '/nonexistent': No such file or directory"))
    rc, out, err = run(capsys, "--config-file", write_conf(tmp_path, ENABLED),
                       "host", "check", "-f", "json", probe_factory=Factory(probe))
    assert (rc, out) == (1, "")
    assert err.splitlines() == [
        "vtpm-driver: error: cannot connect to libvirt at "
        "qemu+unix:///system?socket=/nonexistent: Failed to connect socket to "
        "'/nonexistent': No such file or directory"
    ]
    assert probe.closed


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("[libvirt]\nvirt_type = xen\n",
         "[libvirt] virt_type: Valid values are [kvm, lxc, qemu, parallels], but found 'xen'"),
        ("[libvirt]\nswtpm_enabled = maybe\n",
         "[libvirt] swtpm_enabled: Unexpected boolean value 'maybe'"),
        ("[libvirt\n", "Failed to parse"),
    ],
)
def test_host_check_invalid_config_exit_1_one_line(capsys, tmp_path, text, line):
    path = write_conf(tmp_path, text)
    rc, out, err = run(capsys, "--config-file", path, "host", "check", "-f", "json",
                       probe_factory=Factory(FakeProbe()))
    assert (rc, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert err.startswith(f"vtpm-driver: error: invalid configuration ({path}): ")
    assert line in err


def test_host_check_missing_config_file_exit_1(capsys, tmp_path):
    missing = str(tmp_path / "missing.conf")
    rc, out, err = run(capsys, "--config-file", missing, "host", "check",
                       probe_factory=Factory(FakeProbe()))
    assert (rc, out) == (1, "")
    assert err.splitlines() == [
        f"vtpm-driver: error: invalid configuration ({missing}): "
        f"Failed to find some config files: {missing}"
    ]


def test_request_check_ignores_a_broken_config(capsys, tmp_path):
    # Only commands that need the configuration load it.
    path = write_conf(tmp_path, "[libvirt\n")
    rc, _, err = run(capsys, "--config-file", path, "request", "check")
    assert (rc, err) == (0, "")


def test_register_commands_is_one_line_per_module():
    assert "vtpm_driver.cli.checks" in cli_main.COMMAND_MODULES
    app = cli_main.VTPMDriverApp()
    names = {name for name, _ in app.command_manager}
    assert {"request check", "host check"} <= names
