"""The option namespace loads and the checked-in sample config is current."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest
from oslo_config import cfg

from vtpm_driver import conf

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_nova_names_and_defaults() -> None:
    c = conf.new_conf()
    assert c.libvirt.swtpm_enabled is False
    assert c.libvirt.swtpm_user == "tss"
    assert c.libvirt.swtpm_group == "tss"
    assert c.libvirt.virt_type == "kvm"
    assert c.libvirt.connection_uri == ""
    assert c.libvirt.supported_tpm_secret_security == ["user", "host", "deployment"]
    assert c.vtpm.owner_only_acl is True
    assert conf.libvirt_uri(c) == "qemu:///system"


def test_coexists_with_already_registered_options() -> None:
    """Nova registers [libvirt] swtpm_* with its own help text: no DuplicateOptError."""
    c = cfg.ConfigOpts()
    c.register_opt(cfg.BoolOpt("swtpm_enabled", default=False, help="nova's"), group="libvirt")
    conf.register_opts(c)
    c([])
    assert c.libvirt.swtpm_enabled is False
    assert c.libvirt.swtpm_user == "tss"


def test_every_option_has_help() -> None:
    for group, opts in conf.list_opts():
        for opt in opts:
            assert opt.help, f"[{group.name}] {opt.name} has no help text"


def _generator() -> str:
    exe = shutil.which("oslo-config-generator", path=str(pathlib.Path(sys.executable).parent))
    if exe is None:
        pytest.fail("oslo-config-generator is not installed next to this Python")
    return exe


def test_sample_config_is_current(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "sample.conf"
    subprocess.run(
        [_generator(), "--config-file", str(ROOT / "etc/vtpm-driver-config-generator.conf"),
         "--output-file", str(out)],
        check=True, cwd=ROOT, capture_output=True,
    )
    checked_in = (ROOT / "etc/vtpm-driver.conf.sample").read_text()
    assert out.read_text() == checked_in, (
        "etc/vtpm-driver.conf.sample is stale: run `tox -e genconfig`"
    )
