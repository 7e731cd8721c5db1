"""Boot: from the driver's ``spawn`` (or ``power_on``) call to the guest's ``VTPM_RESULT``.

The test guest (``tools/build-guest.sh``) prints one ``VTPM_RESULT ...`` line
on its serial console once it has probed the TPM, then powers off. The time
from the call to that line is what a user waits for, TPM included:

* ``no_tpm``: spawn without vTPM (the baseline), and ``no_tpm_later_boot``:
  ``power_on`` of that server after it powered off (the baseline for later boots);
* ``vtpm_first_boot``: spawn with ``hw:tpm_version=2.0``: Barbican secret,
  libvirt secret, ``swtpm_setup`` manufacturing the TPM, then the guest;
* ``vtpm_later_boot``: ``power_on`` of that server once it has powered off:
  one Barbican GET, libvirt secret, swtpm resuming its encrypted state.

Optionally N vTPM spawns run at once (``concurrent_spawns``). Every server is
destroyed with the driver afterwards; anything the driver could not remove is
removed by hand and counted in ``cleanup_failures``.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from bench import stats
from vtpm_driver import conf as vtpm_conf
from vtpm_driver.guestreport import last_result as parse_result
from vtpm_driver.keymgr import context as vtpm_context

GUEST_DIR = Path(os.environ.get("VTPM_GUEST_DIR", "/var/cache/vtpm-driver/guest"))
CMDLINE = "console=ttyS0"
MEMORY_MB = 256
BOOT_TIMEOUT = 180.0
SHUTOFF_TIMEOUT = 60.0
VTPM_SPECS = {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-tis"}
KINDS = ("no_tpm", "no_tpm_later_boot", "vtpm_first_boot", "vtpm_later_boot")
# tools/guest/init polls 10 x 100 ms for /dev/tpm0 before reporting "none": a
# guest without TPM prints its line this much later than it otherwise would.
NO_TPM_GUEST_WAIT_S = 1.0


class BootUnavailable(RuntimeError):
    """The driver lifecycle or the test guest is not there: the section is skipped."""


def check_available() -> None:
    """Raise BootUnavailable unless spawn/destroy/power_on and the guest files exist."""
    try:
        from vtpm_driver import driver
        from vtpm_driver.standalone import servers
    except ImportError as exc:
        raise BootUnavailable(f"vtpm_driver lifecycle not importable: {exc}") from None
    missing = [m for m in ("spawn", "destroy", "power_on")
               if not callable(getattr(driver.VTPMDriver, m, None))]
    if missing or not callable(getattr(servers, "new_instance", None)):
        raise BootUnavailable(
            f"VTPMDriver lacks {', '.join(missing) or 'servers.new_instance'} (not landed yet)")
    for name in ("vmlinuz", "initrd.img"):
        if not (GUEST_DIR / name).is_file():
            raise BootUnavailable(f"test guest {GUEST_DIR / name} missing: run "
                                  "tools/build-guest.sh")


def wait_for_result(console_log: Path, t0: float, timeout: float = BOOT_TIMEOUT
                    ) -> tuple[float, dict[str, str]]:
    """Seconds from ``t0`` until the console shows a ``VTPM_RESULT`` line, and its fields."""
    deadline = t0 + timeout
    while True:
        try:
            text = console_log.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            text = ""
        result = parse_result(text)
        if result is not None:
            return time.perf_counter() - t0, result
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no VTPM_RESULT in {console_log} after {timeout:.0f} s")
        time.sleep(0.02)


def _call(method: Any, **kwargs: Any) -> Any:
    """Call a Nova-shaped driver method with the keyword arguments it accepts."""
    params = inspect.signature(method).parameters
    accepted = {k: v for k, v in kwargs.items() if k in params}
    return method(**accepted)


class Boot(NamedTuple):
    """One boot: the driver call's duration, time to the result line, the result."""

    call_s: float
    result_s: float
    result: dict[str, str]


class BootRunner:
    """Spawns, powers on and destroys bench servers through the real driver."""

    def __init__(self, ctx: vtpm_context.RequestContext, workdir: Path) -> None:
        from vtpm_driver.driver import VTPMDriver

        self.ctx = ctx
        self.workdir = workdir
        self.conf = vtpm_conf.new_conf()
        self.conf.set_override("virt_type", "qemu", group="libvirt")
        self.conf.set_override("swtpm_enabled", True, group="libvirt")
        self.driver = VTPMDriver(self.conf)
        self.run_id = uuid.uuid4().hex[:8]
        self._seq = 0
        self.created: list[Any] = []
        self.cleanup_failures = 0

    def new_instance(self, vtpm: bool) -> tuple[Any, Path]:
        from vtpm_driver.standalone import servers

        self._seq += 1
        name = f"vtpm-bench-boot-{self.run_id}-{self._seq:03d}"
        console = self.workdir / f"{name}.log"
        inst = servers.new_instance(
            name, self.ctx, flavor_extra_specs=dict(VTPM_SPECS) if vtpm else {},
            image_properties={}, kernel=str(GUEST_DIR / "vmlinuz"),
            initrd=str(GUEST_DIR / "initrd.img"), cmdline=CMDLINE, vcpus=1,
            memory_mb=MEMORY_MB, console_log=str(console))
        return inst, console

    def spawn(self, inst: Any, console: Path) -> Boot:
        """Spawn; seconds until the call returned and until the guest's result line."""
        console.unlink(missing_ok=True)
        self.created.append(inst)
        t0 = time.perf_counter()
        _call(self.driver.spawn, context=self.ctx, instance=inst, image_meta=inst.image_meta,
              injected_files=[], admin_password=None, allocations={}, network_info=[],
              block_device_info=None)
        call_s = time.perf_counter() - t0
        return Boot(call_s, *wait_for_result(console, t0))

    def power_on(self, inst: Any, console: Path) -> Boot:
        """power_on once the guest is off; same two times as :meth:`spawn`."""
        self.wait_shutoff(inst)
        console.unlink(missing_ok=True)  # libvirt appends: the old line must not count
        t0 = time.perf_counter()
        _call(self.driver.power_on, context=self.ctx, instance=inst, network_info=[],
              block_device_info=None)
        call_s = time.perf_counter() - t0
        return Boot(call_s, *wait_for_result(console, t0))

    def wait_shutoff(self, inst: Any, timeout: float = SHUTOFF_TIMEOUT) -> None:
        """The guest powers itself off after printing; wait until libvirt sees that."""
        import libvirt

        conn = libvirt.open(vtpm_conf.libvirt_uri(self.conf))
        try:
            dom = conn.lookupByUUIDString(inst.uuid)
            deadline = time.monotonic() + timeout
            while dom.state()[0] != libvirt.VIR_DOMAIN_SHUTOFF:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{inst.name} still running after {timeout:.0f} s")
                time.sleep(0.05)
        finally:
            conn.close()

    def destroy(self, inst: Any) -> None:
        _call(self.driver.destroy, context=self.ctx, instance=inst, network_info=[],
              block_device_info=None, destroy_disks=True)
        self.created.remove(inst)

    def cleanup(self) -> None:
        """Destroy whatever is still there; fall back to removing it by hand."""
        from bench.scale_bench import undefine_domains
        from vtpm_driver import keymgr
        from vtpm_driver.virt import connection

        for inst in list(self.created):
            try:
                self.destroy(inst)
            except Exception:  # counted; removed by hand below
                self.cleanup_failures += 1
        if not self.created:
            return
        km = keymgr.KeyManager(self.conf)
        for inst in self.created:
            try:
                km.delete_vtpm_secret(self.ctx, inst, "user")
            except Exception:  # last resort: keep cleaning
                pass
        with connection.Hypervisor(vtpm_conf.libvirt_uri(self.conf)) as hv:
            undefine_domains(hv.conn, f"boot-{self.run_id}")


def _boot_kind(boots: list[Boot]) -> dict:
    return {"latency_s": stats.summarize([b.result_s for b in boots], digits=3),
            "call_s": stats.summarize([b.call_s for b in boots], digits=3),
            "guest_saw": sorted({f"version={b.result.get('version')} "
                                 f"driver={b.result.get('driver')}" for b in boots})}


def run(ctx: vtpm_context.RequestContext, runs: int, concurrency: list[int]) -> dict:
    """The boot section: ``runs`` boots of each kind, then concurrent spawns."""
    check_available()
    workdir = Path(tempfile.mkdtemp(prefix="vtpm-bench-boot-"))
    os.chmod(workdir, 0o755)  # QEMU may run as another user and must write the console
    runner = BootRunner(ctx, workdir)
    boots: dict[str, list[Boot]] = {k: [] for k in KINDS}
    destroy_s: list[float] = []
    section: dict[str, Any] = {"runs": runs, "guest": str(GUEST_DIR),
                               "no_tpm_guest_wait_s": NO_TPM_GUEST_WAIT_S}
    try:
        runner.driver.init_host("bench-host")
        # One untimed vTPM boot first: libvirt's first QEMU probe and a cold page
        # cache would otherwise land on whichever kind runs first.
        inst, console = runner.new_instance(vtpm=True)
        runner.spawn(inst, console)
        runner.wait_shutoff(inst)
        runner.destroy(inst)
        for _ in range(runs):
            for vtpm, first, later in ((False, "no_tpm", "no_tpm_later_boot"),
                                       (True, "vtpm_first_boot", "vtpm_later_boot")):
                inst, console = runner.new_instance(vtpm=vtpm)
                for kind, boot in ((first, runner.spawn), (later, runner.power_on)):
                    boots[kind].append(boot(inst, console))
                runner.wait_shutoff(inst)
                t0 = time.perf_counter()
                runner.destroy(inst)
                destroy_s.append(time.perf_counter() - t0)
        for kind in KINDS:
            section[kind] = _boot_kind(boots[kind])
        section["destroy_s"] = stats.summarize(destroy_s, digits=3)
        section["overhead_ratio_vs_no_tpm"] = _overheads(section, adjust=0.0)
        section["overhead_ratio_vs_no_tpm_adjusted"] = _overheads(
            section, adjust=NO_TPM_GUEST_WAIT_S)
        section["host_side_extra_s"] = _host_extra(section)
        section["concurrent_spawns"] = [_concurrent(runner, n) for n in concurrency]
    finally:
        runner.cleanup()
        section["cleanup_failures"] = runner.cleanup_failures
        for f in workdir.glob("*.log"):
            f.unlink(missing_ok=True)
        workdir.rmdir()
    return section


def _overheads(section: dict, adjust: float) -> dict[str, float | None]:
    """vTPM median / no-TPM median, first boots and later boots compared like for like.

    ``adjust`` seconds are taken off the no-TPM medians: the test guest waits
    that long for a ``/dev/tpm0`` that never comes before it reports ``none``.
    """
    def median(kind: str) -> float | None:
        return section[kind]["latency_s"].get("median")

    out: dict[str, float | None] = {}
    for vtpm_kind, base_kind in (("vtpm_first_boot", "no_tpm"),
                                 ("vtpm_later_boot", "no_tpm_later_boot")):
        base = median(base_kind)
        out[vtpm_kind] = stats.ratio(median(vtpm_kind),
                                     base - adjust if base is not None else None)
    return out


def _host_extra(section: dict) -> dict[str, float | None]:
    """Extra seconds the driver call itself takes with a vTPM (Barbican, secret, swtpm).

    Host side only: the call returns once QEMU runs, before the guest boots,
    so the test guest's own TPM probing and waiting do not enter this number.
    """
    out: dict[str, float | None] = {}
    for vtpm_kind, base_kind in (("vtpm_first_boot", "no_tpm"),
                                 ("vtpm_later_boot", "no_tpm_later_boot")):
        a = section[vtpm_kind]["call_s"].get("median")
        b = section[base_kind]["call_s"].get("median")
        out[vtpm_kind] = round(a - b, 3) if a is not None and b is not None else None
    return out


def _concurrent(runner: BootRunner, n: int) -> dict:
    """N vTPM spawns at once: wall time until every guest has printed its result."""
    pairs = [runner.new_instance(vtpm=True) for _ in range(n)]
    failures: dict[str, int] = {}
    per_guest: list[float] = []
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(runner.spawn, inst, console) for inst, console in pairs]
        for fut in concurrent.futures.as_completed(futures):
            try:
                per_guest.append(fut.result().result_s)
            except Exception as exc:  # counted and reported
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
    wall = time.perf_counter() - t0
    for inst, _console in pairs:
        if inst in runner.created:
            try:
                runner.wait_shutoff(inst)
                runner.destroy(inst)
            except Exception:  # runner.cleanup() retries it
                pass
    return {"concurrency": n, "succeeded": len(per_guest), "failures": sum(failures.values()),
            "failure_types": failures, "wall_s": round(wall, 3),
            "boots_per_minute": round(60.0 * len(per_guest) / wall, 2) if wall > 0 else None,
            "per_guest_s": stats.summarize(per_guest, digits=3)}
