"""The agent's browser: what it costs in memory, from the sandbox's own cgroup.

Starts one OpenClaw gateway in a local sandbox (LocalBackend: pasta + bubblewrap + cgroups) with
the browser on and the internet allowed, as a pro plan's, and reads the sandbox cgroup's memory
(``memory.current`` on cgroup v2, ``memory.usage_in_bytes`` on v1: everything in the sandbox,
page cache and tmpfs included) at three points, each after ``--settle`` seconds:

1. the agent started, its browser not used yet (OpenClaw starts it on first use);
2. the browser started (``openclaw browser start`` inside the sandbox, what the browser tool's
   first call does);
3. after one page (``openclaw browser open <url>``), a small page served from a network
   namespace made for the run (``tests.netns``: a second machine on 10.213.<n>.2).

Needs root. Ends with ``RESULT gateway_mb=... browser_idle_mb=... after_page_mb=...``.

    .venv/bin/python bench/browser.py [--settle 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

import django  # noqa: E402
from django.conf import settings  # noqa: E402

django.setup()

from sandboxes.backends.base import SandboxSpec  # noqa: E402
from sandboxes.backends.local import LocalBackend  # noqa: E402
from sandboxes.openclaw.config import (  # noqa: E402
    CONFIG_PATH,
    BrowserOptions,
    prepare_data_dir,
    render_config,
    sandbox_env,
)
from sandboxes.openclaw.runtime import build_runtime, node_binary, openclaw_entry  # noqa: E402
from tests.fixtures.runtime import remove_cgroup_parent  # noqa: E402
from tests.netns import HostNamespace  # noqa: E402

MB = 1024 * 1024
PAGE = "<!doctype html><title>Hermit bench page</title><h1>Hello</h1>" + "<p>text</p>" * 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--settle", type=float, default=5.0)
    args = parser.parse_args()
    runtime = build_runtime(
        settings.HERMIT_RUNTIME_DIR, settings.HERMIT_OPENCLAW_VERSION, settings.HERMIT_NODE_VERSION
    )
    scratch = Path(tempfile.mkdtemp(prefix="bench-browser-", dir=settings.HERMIT_DATA_DIR))
    os.chmod(scratch, 0o711)
    site = Path(tempfile.mkdtemp(prefix="bench-browser-site-"))
    (site / "page.html").write_text(PAGE)
    parent = f"hermit-bench-{os.getpid()}"
    backend = LocalBackend(run_root=scratch / "run", cgroup_parent=parent)
    try:
        with HostNamespace(forward=()) as ns:
            server = [sys.executable, "-m", "http.server", "8080", "--bind", ns.address]
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            ns.popen([*server, "--directory", str(site)], **quiet)
            url = f"http://{ns.address}:8080/page.html"
            measure(backend, runtime, scratch, ns.address, url, args.settle)
    finally:
        remove_cgroup_parent(backend.cgroup_root, parent)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(site, ignore_errors=True)


def measure(
    backend: LocalBackend, runtime: Path, scratch: Path, host: str, url: str, settle: float
) -> None:
    data_dir = scratch / "data"
    prepare_data_dir(data_dir)
    options = BrowserOptions(executable=settings.HERMIT_BROWSER_EXECUTABLE, allowed_hosts=(host,))
    config = render_config(
        data_dir=data_dir, ai_gateway_port=9, models=["bench-model"], browser=options
    )
    spec = SandboxSpec(
        sandbox_id=900_000 + os.getpid() % 1000,
        name="bench-browser",
        data_dir=data_dir,
        runtime_dir=runtime,
        env=sandbox_env(
            data_dir=data_dir, gateway_token="bench", ai_key="bench", config_file=CONFIG_PATH
        ),
        memory_mb=3072,
        cpu_millis=2000,
        pids_max=1024,
        internet=True,
        browser=True,
        files={CONFIG_PATH: json.dumps(config)},
    )
    state: dict[str, object] = {}
    for step in backend.start(spec):
        state = step.state or state
    cli = [str(node_binary(runtime)), str(openclaw_entry(runtime)), "browser", "--json"]
    try:
        figures = {"gateway_mb": settled(backend, spec, state, settle)}
        print(f"agent started, browser not used: {figures['gateway_mb']:.0f} MB", flush=True)
        began = time.monotonic()
        run(backend, spec, state, [*cli, "start"])
        print(f"browser start: {time.monotonic() - began:.1f} s")
        figures["browser_idle_mb"] = settled(backend, spec, state, settle)
        print(f"browser started, no page: {figures['browser_idle_mb']:.0f} MB", flush=True)
        began = time.monotonic()
        run(backend, spec, state, [*cli, "open", url])
        print(f"open one page: {time.monotonic() - began:.1f} s")
        figures["after_page_mb"] = settled(backend, spec, state, settle)
        print(f"after one page: {figures['after_page_mb']:.0f} MB")
        processes = backend.processes(spec, state)
        exe = settings.HERMIT_BROWSER_EXECUTABLE
        chromium = [p for p in processes if p.command.split(" ", 1)[0] == exe]
        rss = sum(p.rss_bytes for p in chromium) / MB
        print(f"chromium processes: {len(chromium)}, RSS sum {rss:.0f} MB (shared pages counted)")
    finally:
        backend.stop(spec, state)
    print("RESULT " + " ".join(f"{key}={value:.0f}" for key, value in figures.items()))


def settled(backend: LocalBackend, spec: SandboxSpec, state: dict[str, object], s: float) -> float:
    time.sleep(s)
    return backend.stats(spec, state, disk=False).memory_bytes / MB


def run(
    backend: LocalBackend, spec: SandboxSpec, state: dict[str, object], argv: list[str]
) -> None:
    result = backend.exec(spec, state, argv, timeout=180)
    if result.exit_code != 0:
        raise SystemExit(f"{' '.join(argv[2:])} failed: {result.stdout}\n{result.stderr}")


if __name__ == "__main__":
    main()
