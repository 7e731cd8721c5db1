"""Migration benchmark: live and cold migration between the two test hosts.

In ONE run, on host-a and host-b of ``tools/test-hosts.sh``: a running server
with a vTPM (``user`` mode, the owner's credentials: the passphrase is read
from Barbican once per move) and the same server without one are each
live-migrated A->B->A ``runs`` times, and cold-migrated A->B (then reverted)
``runs`` times. Each time is the whole ``ServerService.migrate`` call (checks,
passphrase, libvirt's migration, secret clean-up). The ratio vTPM / no vTPM
and the vTPM's share ((vTPM - plain) / vTPM) come from the medians of the same
run, so they hold on a slow machine. Targets: :mod:`bench.targets`.

``python -m bench.migrate_bench [RUNS]`` prints the section as JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HOSTS = {"host-a": "qemu+tcp://127.0.0.1:16611/system",
         "host-b": "qemu+tcp://127.0.0.1:16612/system"}
REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = Path(os.environ.get("VTPM_GUEST_DIR", "/var/cache/vtpm-driver/guest"))
VTPM_SPECS = {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}


class MigrateUnavailable(RuntimeError):
    """The test hosts or the guest are missing: the section is skipped."""


def check_available() -> None:
    rc = subprocess.run(["bash", str(REPO / "tools" / "test-hosts.sh"), "status"],
                        capture_output=True, timeout=60, check=False).returncode
    if rc != 0:
        raise MigrateUnavailable("test hosts not running (tools/test-hosts.sh start)")
    if not (GUEST_DIR / "vmlinuz").exists():
        raise MigrateUnavailable(f"no test guest in {GUEST_DIR} (tools/build-guest.sh)")


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def run(ctx: Any, runs: int = 3) -> dict:
    """Times of live and cold migrations with and without a vTPM (seconds)."""
    from vtpm_driver import conf as vtpm_conf
    from vtpm_driver.hosts import HostSet
    from vtpm_driver.service import ServerService

    conf = vtpm_conf.new_conf()
    conf.set_override("virt_type", "qemu", group="libvirt")
    conf.set_override("swtpm_enabled", True, group="libvirt")
    conf.set_override("guest_start_timeout", 240, group="vtpm")
    conf.set_override("hosts", dict(HOSTS), group="vtpm")
    workdir = Path(tempfile.mkdtemp(prefix="vtpm-bench-migrate-"))
    os.chmod(workdir, 0o755)
    conf.set_override("console_log_dir", str(workdir), group="vtpm")

    def call(method: str, *args: Any, **kwargs: Any) -> Any:
        service = ServerService(conf, None, context=lambda: ctx, hosts=HostSet(conf),
                                host=kwargs.pop("host", None))
        try:
            return getattr(service, method)(*args, **kwargs)
        finally:
            service.close()

    times: dict[str, list[float]] = {f"{k}_{m}": [] for k in ("vtpm", "no_tpm")
                                     for m in ("live", "cold")}
    names = []
    try:
        for kind, specs in (("vtpm", VTPM_SPECS), ("no_tpm", {})):
            name = f"vtpm-bench-mig-{kind}-{uuid.uuid4().hex[:6]}"
            names.append(name)
            call("create", name, host="host-a", flavor_extra_specs=dict(specs),
                 image_properties={}, kernel=str(GUEST_DIR / "vmlinuz"),
                 initrd=str(GUEST_DIR / "initrd.img"),
                 cmdline="console=ttyS0 vtpm_test=stay")
            for _ in range(runs):
                for dest in ("host-b", "host-a"):
                    t0 = time.perf_counter()
                    call("migrate", name, dest, live=True)
                    times[f"{kind}_live"].append(time.perf_counter() - t0)
            for _ in range(runs):
                t0 = time.perf_counter()
                call("migrate", name, "host-b", live=False)
                times[f"{kind}_cold"].append(time.perf_counter() - t0)
                call("revert_resize", name)
    finally:
        for name in names:
            try:
                call("delete", name)
            except Exception as exc:
                print(f"cleanup of {name} failed: {exc}", file=sys.stderr)
    out: dict[str, Any] = {"runs": runs, "seconds": {k: [round(v, 3) for v in vals]
                                                     for k, vals in times.items()}}
    for move in ("live", "cold"):
        vtpm, plain = _median(times[f"vtpm_{move}"]), _median(times[f"no_tpm_{move}"])
        out[move] = {
            "vtpm_median_s": vtpm, "no_tpm_median_s": plain,
            "ratio": round(vtpm / plain, 3) if vtpm and plain else None,
            "vtpm_share": round((vtpm - plain) / vtpm, 3) if vtpm and plain else None,
        }
    return out


def main(argv: list[str]) -> int:
    from bench import keymgr_bench, services

    check_available()
    ctx = keymgr_bench.owner_context(services.load_clouds()["owner"])
    print(json.dumps(run(ctx, int(argv[0]) if argv else 3), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
