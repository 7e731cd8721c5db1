"""Where a live migration's time goes: a bench-only step trace (no change to the driver).

:class:`StepTrace` wraps the functions a ``ServerService.migrate`` call goes
through (looked up at call time, so wrapping the module or class attribute is
enough) with :func:`time.perf_counter`, and records each call's inclusive time
with its nesting depth. It is installed only around one traced call and
removed after it; the driver's code is never edited for it.

``python -m bench.migrate_trace`` creates one server per kind (no TPM, and a
vTPM in ``user``, ``host`` and ``deployment`` mode) on host-a, warms each up
with one untimed live migration A->B->A, then traces one A->B and one B->A
and prints the steps as JSON (milliseconds).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

#: (owner module path, attribute path, step name). Class methods are "Class.method".
STEPS: tuple[tuple[str, str, str], ...] = (
    ("vtpm_driver.service", "ServerService.migrate", "ServerService.migrate"),
    ("vtpm_driver.service", "ServerService._target", "caller + locate server"),
    ("vtpm_driver.service", "ServerService._connect", "connect (first use)"),
    ("vtpm_driver.service", "ServerService.describe", "describe (result)"),
    ("vtpm_driver.hosts", "HostSet.side", "destination side"),
    ("vtpm_driver.ops.migrate", "_prepare", "prepare (checks + passphrase)"),
    ("vtpm_driver.ops.guests", "Guests.lookup", "domain lookup"),
    ("vtpm_driver.ops.guests", "Guests.check_host_offers", "destination host report"),
    ("vtpm_driver.ops.migrate", "HostSide.check_destination", "destination checks"),
    ("vtpm_driver.ops.migrate", "HostSide.fetch_secret", "passphrase read"),
    ("vtpm_driver.keymgr", "KeyManager.get_vtpm_secret", "Barbican GET"),
    ("vtpm_driver.virt.migrate", "HostSecretReader.__call__", "host secret read"),
    ("vtpm_driver.virt.migrate", "domain_xml", "domain XML"),
    ("vtpm_driver.ops.migrate", "give_destination", "secret define on destination"),
    ("vtpm_driver.virt.migrate", "migrate", "libvirt migrateToURI3"),
    ("vtpm_driver.ops.migrate", "incoming_running", "ephemeral secret undefine"),
    ("vtpm_driver.ops.migrate", "LiveMigration._cleanup_source", "source cleanup"),
    ("vtpm_driver.service", "ServerService.close", "close connections"),
)


class StepTrace:
    """Inclusive timings of the wrapped steps of one call, in call order."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._depth = 0

    def _wrap(self, name: str, func: Any) -> Any:
        trace = self

        @functools.wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Any:
            entry = {"step": name, "depth": trace._depth, "ms": None}
            trace.records.append(entry)
            trace._depth += 1
            t0 = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                entry["ms"] = round((time.perf_counter() - t0) * 1000, 1)
                trace._depth -= 1
        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[StepTrace]:
        """Wrap every step of :data:`STEPS` that exists; unwrap on exit."""
        import importlib

        undo = []
        for module_name, path, name in STEPS:
            owner: Any = importlib.import_module(module_name)
            *parents, attr = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            original = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(
                owner, attr, None)
            if original is None:
                continue
            setattr(owner, attr, self._wrap(name, original))
            undo.append((owner, attr, original))
        try:
            yield self
        finally:
            for owner, attr, original in reversed(undo):
                setattr(owner, attr, original)

    def summary(self) -> list[str]:
        return [f"{'  ' * r['depth']}{r['step']}: {r['ms']} ms" for r in self.records]


def run(contexts: dict[str, Any], conf: Any, guest_dir: Any) -> dict[str, Any]:
    """One traced live migration each way per kind (see the module docstring)."""
    from vtpm_driver.hosts import HostSet
    from vtpm_driver.service import ServerService

    def call(method: str, *args: Any, host: str | None = None, who: str = "owner",
             **kwargs: Any) -> Any:
        service = ServerService(conf, None, context=lambda: contexts[who],
                                hosts=HostSet(conf), host=host)
        try:
            return getattr(service, method)(*args, **kwargs)
        finally:
            service.close()

    kinds = {"no_tpm": {}, **{mode: {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb",
                                     "hw:tpm_secret_security": mode}
                              for mode in ("user", "host", "deployment")}}
    out: dict[str, Any] = {}
    names = []
    try:
        for kind, specs in kinds.items():
            name = f"vtpm-bench-trace-{kind}-{uuid.uuid4().hex[:6]}"
            names.append(name)
            call("create", name, host="host-a", flavor_extra_specs=specs, image_properties={},
                 kernel=str(guest_dir / "vmlinuz"), initrd=str(guest_dir / "initrd.img"),
                 cmdline="console=ttyS0 vtpm_test=stay")
            call("migrate", name, "host-b", live=True)  # warm-up
            call("migrate", name, "host-a", live=True)
            out[kind] = {}
            for dest in ("host-b", "host-a"):
                trace = StepTrace()
                with trace.installed():
                    call("migrate", name, dest, live=True)
                out[kind][f"to_{dest}"] = trace.summary()
    finally:
        for name in names:
            try:
                call("delete", name)
            except Exception as exc:
                print(f"cleanup of {name} failed: {exc}", file=sys.stderr)
    return out


def main(argv: list[str]) -> int:
    from bench import keymgr_bench, migrate_bench, services

    migrate_bench.check_available()
    clouds = services.load_clouds()
    ctx = keymgr_bench.owner_context(clouds["owner"])
    conf = migrate_bench.bench_conf(clouds.get("service"))
    try:
        print(json.dumps(run({"owner": ctx}, conf, migrate_bench.GUEST_DIR), indent=2))
    finally:
        migrate_bench.remove_workdir(conf)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
