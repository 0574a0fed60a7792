"""Cold start and idle memory: OpenClaw gateways in local sandboxes versus bare gateways.

For N gateways started at once (default N = 1 and 3), repeated ``--runs`` times, prints the
median time from the start request to a 200 from ``/readyz`` and the median idle memory per
gateway (anonymous + shmem RSS of a cgroup holding just that gateway, read after ``--settle``
seconds), for bare gateways (plain ``node openclaw.mjs gateway run`` on the host) and for sandboxed
ones (LocalBackend: pasta + bubblewrap + cgroups), and the sandbox/bare ratio. Every start uses
a fresh data directory, so these are true cold starts. Needs root. Ends with one
``RESULT key=value ...`` line of the headline figures (per count N: ``ready_bare_xN_s``,
``ready_sandbox_xN_s``, ``ready_ratio_xN``, ``paired_ratio_xN``, ``cpu_ratio_xN``,
``rss_sandbox_xN_mb``, ``rss_ratio_xN``).

Everything the gateways touch (data dirs, their working directory) lies in the settings' data
dir, which the gateways' own uids can enter wherever the checkout is (say a 0700 home).

    .venv/bin/python bench/cold_start.py [--counts 1,3] [--runs 3] [--settle 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

import django  # noqa: E402
from django.conf import settings  # noqa: E402

django.setup()

from sandboxes.backends import cgroups  # noqa: E402
from sandboxes.backends.base import SandboxSpec  # noqa: E402
from sandboxes.backends.local import LocalBackend, _free_port  # noqa: E402
from sandboxes.openclaw.config import (  # noqa: E402
    CONFIG_PATH,
    config_path,
    prepare_data_dir,
    render_config,
    sandbox_env,
)
from sandboxes.openclaw.runtime import build_runtime, node_binary, openclaw_entry  # noqa: E402

CGROUP_PARENT = f"hermit-bench-{os.getpid()}"
MB = 1024 * 1024


def make_data_dir(root: Path, index: int, *, sandboxed: bool) -> tuple[Path, dict[str, str], str]:
    """Return a fresh data dir, the gateway's environment and its config (JSON). A bare gateway
    reads the config from its state dir; a sandboxed one from CONFIG_PATH, as in production."""
    data_dir = root / f"gw-{index}"
    prepare_data_dir(data_dir)
    config = json.dumps(render_config(data_dir=data_dir, ai_gateway_port=9, models=["bench-model"]))
    if not sandboxed:
        config_path(data_dir).write_text(config)
    env = sandbox_env(
        data_dir=data_dir,
        gateway_token="bench",
        ai_key="bench",
        config_file=CONFIG_PATH if sandboxed else None,
    )
    return data_dir, env, config


def wait_ready(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"gateway on port {port} not ready")


class Bare:
    """A gateway run directly on the host, in an unlimited cgroup used only to measure it."""

    def __init__(self, runtime: Path, root: Path, index: int) -> None:
        self.data_dir, env, _ = make_data_dir(root, index, sandboxed=False)
        self.port = _free_port()
        self.paths = cgroups.create(
            Path("/sys/fs/cgroup"), CGROUP_PARENT, f"bare-{index}", 1 << 20, 100_000, 100_000
        )
        env["PATH"] = f"{node_binary(runtime).parent}:/usr/bin:/bin"
        env["HERMIT_CGROUP_PROCS"] = " ".join(cgroups.procs_files(self.paths))
        # Its own uid, as sandboxes have: OpenClaw keeps lock files in /tmp/openclaw-state-locks-
        # <uid>, so bare gateways sharing a uid would queue on each other's locks.
        uid = self.uid = 890_000 + index
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            os.lchown(path, uid, uid)
        argv = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups", str(node_binary(runtime))]
        argv = ["setpriv", *argv, str(openclaw_entry(runtime)), "gateway", "run"]
        join = 'for f in $HERMIT_CGROUP_PROCS; do echo $$ > "$f"; done; exec "$@"'
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", join, "bare", *argv, "--port", str(self.port)],
            cwd=self.data_dir,  # not the bench's own directory: that uid may not enter it
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(self.port, self.started + 120)
        except BaseException:
            self.stop()  # not in the batch's list yet: leave no process or cgroup behind
            raise
        self.ready_after = time.monotonic() - self.started
        self.cpu_at_ready = cgroups.cpu_seconds(self.paths)

    def rss(self) -> int:
        return cgroups.rss_bytes(self.paths)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        cgroups.kill_all(self.paths)
        cgroups.remove(self.paths)
        shutil.rmtree(f"/tmp/openclaw-state-locks-{self.uid}", ignore_errors=True)
        shutil.rmtree(f"/tmp/openclaw-{self.uid}", ignore_errors=True)


class Sandboxed:
    """A gateway started through the local backend."""

    def __init__(self, backend: LocalBackend, runtime: Path, root: Path, index: int) -> None:
        data_dir, env, config = make_data_dir(root, index, sandboxed=True)
        self.backend = backend
        self.spec = SandboxSpec(
            sandbox_id=880_000 + index,
            name=f"bench-{index}",
            data_dir=data_dir,
            runtime_dir=runtime,
            env=env,
            memory_mb=2048,
            cpu_millis=0,  # no CPU cap: measure the sandbox, not a plan's limit
            ai_gateway_port=9,
            files={CONFIG_PATH: config},
        )
        self.started = time.monotonic()
        self.state: dict[str, object] = {}
        for progress in backend.start(self.spec):
            self.state = progress.state or self.state
        self.ready_after = time.monotonic() - self.started
        self.cpu_at_ready = cgroups.cpu_seconds(self.state["cgroups"])  # type: ignore[arg-type]

    def rss(self) -> int:
        return cgroups.rss_bytes(self.state["cgroups"])  # type: ignore[arg-type]

    def stop(self) -> None:
        self.backend.stop(self.spec, self.state)


def run_batch(
    make: Callable[[int], Bare | Sandboxed], count: int, settle: float
) -> list[tuple[float, float, int]]:
    """Start ``count`` gateways at once; return (seconds to ready, CPU seconds to ready, idle RSS
    bytes) for each."""
    started: list[Bare | Sandboxed] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        try:
            gateway = make(index)
            with lock:
                started.append(gateway)
        except BaseException as exc:  # reported after the others are stopped
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        time.sleep(settle)
        return [(g.ready_after, g.cpu_at_ready, g.rss()) for g in started]
    finally:
        for gateway in started:
            gateway.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,3", help="gateways started at once, e.g. 1,3")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=5.0, help="idle seconds before measuring")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]

    runtime = build_runtime(settings.HERMIT_RUNTIME_DIR, "2026.9.6", "24.21.0")
    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=settings.HERMIT_DATA_DIR))
    os.chmod(scratch, 0o711)  # sandbox uids traverse it
    backend = LocalBackend(run_root=scratch / "run", cgroup_parent=CGROUP_PARENT)
    results: dict[tuple[str, int], list[tuple[float, float, int]]] = {}
    paired: dict[int, list[float]] = {}  # per run: sandbox median time / bare median time
    serial = iter(range(1_000_000))
    try:
        for count in counts:
            for run in range(args.runs):
                medians: dict[str, float] = {}
                for mode in ("bare", "sandbox"):

                    def make(index: int, mode: str = mode) -> Bare | Sandboxed:
                        n = next(serial)
                        if mode == "bare":
                            return Bare(runtime, scratch, n)
                        return Sandboxed(backend, runtime, scratch, n)

                    batch = run_batch(make, count, args.settle)
                    results.setdefault((mode, count), []).extend(batch)
                    shown = ", ".join(
                        f"{t:.1f}s ({c:.1f} cpu-s) {m / MB:.0f}MB" for t, c, m in batch
                    )
                    print(f"  run {run + 1} {mode:7} x{count}: {shown}", flush=True)
                    medians[mode] = statistics.median(t for t, _, _ in batch)
                paired.setdefault(count, []).append(medians["sandbox"] / medians["bare"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for ctrl in cgroups.V1_CONTROLLERS:
            path = Path("/sys/fs/cgroup", ctrl, CGROUP_PARENT)
            if path.is_dir():
                os.rmdir(path)
    report(counts, results, paired, args.runs)


def report(
    counts: list[int],
    results: dict[tuple[str, int], list[tuple[float, float, int]]],
    paired: dict[int, list[float]],
    runs: int,
) -> None:
    result: dict[str, str] = {}
    print()
    print(
        f"{'at once':>7} | {'ready: bare':>11} {'sandbox':>8} {'ratio':>5} {'paired':>6} | "
        f"{'CPU-s: bare':>11} {'sandbox':>8} {'ratio':>5} | "
        f"{'idle RSS: bare':>14} {'sandbox':>8} {'ratio':>5}"
    )
    for count in counts:
        bare, sbx = results[("bare", count)], results[("sandbox", count)]
        cols = []
        for i in range(3):
            b = statistics.median(row[i] for row in bare)
            s = statistics.median(row[i] for row in sbx)
            cols.append((b, s, s / b))
        (bt, st, tr), (bc, sc, cr), (bm, sm, mr) = cols
        pr = statistics.median(paired[count])
        print(
            f"{count:>7} | {bt:>10.2f}s {st:>7.2f}s {tr:>5.2f} {pr:>6.2f} | {bc:>11.2f} "
            f"{sc:>8.2f} {cr:>5.2f} | {bm / MB:>12.0f}MB {sm / MB:>6.0f}MB {mr:>5.2f}"
        )
        result.update(
            {
                f"ready_bare_x{count}_s": f"{bt:.2f}",
                f"ready_sandbox_x{count}_s": f"{st:.2f}",
                f"ready_ratio_x{count}": f"{tr:.2f}",
                f"paired_ratio_x{count}": f"{pr:.2f}",
                f"cpu_ratio_x{count}": f"{cr:.2f}",
                f"rss_sandbox_x{count}_mb": f"{sm / MB:.0f}",
                f"rss_ratio_x{count}": f"{mr:.2f}",
            }
        )
    print(
        f"\nmedians over {runs} runs of fresh (cold) data dirs. 'paired' = median of each run's"
        " sandbox/bare ready-time ratio (bare and sandboxed starts alternate, so each pair sees"
        " similar machine load). CPU-s = CPU time the gateway's cgroup used until /readyz"
        " answered, which other load on the machine barely moves. Target: under 1.10."
    )
    print("\nRESULT " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
