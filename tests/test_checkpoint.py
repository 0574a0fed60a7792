"""Hibernation with CRIU: a real OpenClaw gateway in the local backend saved to disk and restored.

One gateway is shared by the module. Its AI gateway is a fake model server on a host port (the
sandbox reaches it through pasta's one outbound forward, as it reaches Hermit's AI gateway).
The last test takes the gateway down for good (refused restores), so it runs last.

Run with ``-s`` to see the measured figures (image size, dump time, restore time, RAM).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import statistics
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sandboxes.backends import cgroups
from sandboxes.backends.base import BackendError, CheckpointImage, SandboxSpec
from sandboxes.backends.local import LocalBackend
from sandboxes.openclaw.protocol import DeviceIdentity, GatewayClient
from tests.fakes.model_server import FakeModelServer
from tests.fixtures.runtime import make_gateway_spec

TOKEN = "test-gateway-token"
TERMINAL = {"final", "error", "aborted"}


class AIGatewayFake(FakeModelServer):
    """The fake model server under Hermit's AI gateway paths (``/ai/v1/...``)."""

    def start(self) -> AIGatewayFake:
        super().start()
        return self

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.router.add_post("/ai/v1/chat/completions", self.openai_chat)
        app.router.add_get("/ai/v1/models", self.openai_models)
        return app


@dataclass
class Gateway:
    spec: SandboxSpec
    state: dict[str, Any]
    cold_start_s: float
    figures: dict[str, Any] = field(default_factory=dict)


def run(progress: Iterator[Any]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for step in progress:
        assert 0 <= step.percent <= 100
        state = step.state or state
    return state


def readyz(port: int, timeout: float = 5) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=timeout) as response:
        return int(response.status)


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def assert_nothing_runs(backend: LocalBackend, g: Gateway) -> None:
    memory_cgroup = Path(backend.cgroup_root, "memory", backend.cgroup_parent, g.spec.name)
    assert not memory_cgroup.exists(), "the sandbox's cgroups are removed"
    assert processes_mentioning(str(g.spec.data_dir)) == []
    assert not backend.poll(g.spec, g.state).running


@pytest.fixture(scope="module")
def ai() -> Iterator[AIGatewayFake]:
    server = AIGatewayFake().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateway(
    local_backend: LocalBackend,
    sandbox_root: Path,
    runtime_dir: Path,
    sandbox_ids: Iterator[int],
    ai: AIGatewayFake,
) -> Iterator[Gateway]:
    assert local_backend.checkpoint_support() == "", local_backend.checkpoint_support()
    spec = make_gateway_spec(sandbox_root, runtime_dir, next(sandbox_ids), ai_gateway_port=ai.port)
    started = time.monotonic()
    g = Gateway(spec, run(local_backend.start(spec)), time.monotonic() - started)
    try:
        yield g
    finally:
        local_backend.stop(g.spec, g.state)
        shutil.rmtree(local_backend.checkpoint_dir, ignore_errors=True)


def hibernate(backend: LocalBackend, g: Gateway) -> tuple[CheckpointImage, float, int]:
    """Checkpoint ``g``; return the image, the dump's seconds and the RAM it used before."""
    ram_before = cgroups.memory_usage(g.state["cgroups"])[0]
    started = time.monotonic()
    image = backend.checkpoint(g.spec, g.state)
    return image, time.monotonic() - started, ram_before


def wake(backend: LocalBackend, g: Gateway, image: CheckpointImage) -> float:
    """Restore ``image`` into ``g`` (its state updated); return seconds until /readyz is 200."""
    started = time.monotonic()
    g.state = run(backend.restore(g.spec, image))
    seconds = time.monotonic() - started
    assert readyz(g.state["host_port"]) == 200
    return seconds


def test_it_hibernates_to_disk_freeing_the_ram_and_wakes_on_the_same_port(
    local_backend: LocalBackend, gateway: Gateway
) -> None:
    g = gateway
    port = g.state["host_port"]
    environ = Path(f"/proc/{g.state['main'][0]}/environ").read_bytes()
    image, dump_s, ram_before = hibernate(local_backend, g)

    assert_nothing_runs(local_backend, g)
    location = Path(image.location)
    assert location.parent == local_backend.checkpoint_dir
    assert not location.resolve().is_relative_to(g.spec.data_dir.resolve())
    info = location.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o700)
    assert stat.S_IMODE(local_backend.checkpoint_dir.stat().st_mode) == 0o700
    assert image.size_bytes > 100 * 2**20, "the gateway's memory is in the image"
    assert image.identity == local_backend.data_identity(g.spec)
    # The run dir files a restore needs stay (config, /etc, seccomp filter).
    run_dir = Path(g.state["run_dir"])
    assert (run_dir / "files").is_dir() and (run_dir / "etc" / "passwd").is_file()

    restore_s = wake(local_backend, g, image)
    assert g.state["host_port"] == port, "the portal finds it where it was"
    assert local_backend.poll(g.spec, g.state).running
    ram_after, limit = cgroups.memory_usage(g.state["cgroups"])
    assert limit == g.spec.memory_mb * 2**20, "fresh cgroups with the same limits"
    in_cgroup = {p.pid for p in local_backend.processes(g.spec, g.state)}
    assert {g.state["init"][0], g.state["main"][0], g.state["pasta"][0]} <= in_cgroup
    # The same gateway (its environment, credentials included), not a new one.
    assert Path(f"/proc/{g.state['main'][0]}/environ").read_bytes() == environ
    main_status = Path(f"/proc/{g.state['main'][0]}/status").read_text()
    assert "Seccomp:\t2" in main_status, "the restored gateway is still under its filter"
    local_backend.drop_checkpoint(image.location)
    local_backend.drop_checkpoint(image.location)  # idempotent
    assert not location.exists()
    g.figures.update(
        image_mb=image.size_bytes / 2**20,
        dump_s=dump_s,
        restore_s=[restore_s],
        ram_before_mb=ram_before / 2**20,
        ram_restored_mb=ram_after / 2**20,
    )
    print(
        f"\ncold start {g.cold_start_s:.1f} s; image {image.size_bytes / 2**20:.0f} MB; "
        f"dump {dump_s:.2f} s; restore -> /readyz {restore_s:.2f} s; "
        f"RAM {ram_before / 2**20:.0f} MB before, 0 while saved, {ram_after / 2**20:.0f} MB after"
    )


def test_a_restored_gateway_answers_a_chat_turn(gateway: Gateway, ai: AIGatewayFake) -> None:
    ai.script(reply="Awake again, and I remember.", chunks=3)
    url = f"ws://127.0.0.1:{gateway.state['host_port']}"

    async def chat() -> list[dict[str, Any]]:
        async with GatewayClient(url, token=TOKEN, identity=DeviceIdentity.generate()) as client:
            res = await client.chat_send("Are you there?", session_key="test-checkpoint")
            frames: list[dict[str, Any]] = []

            async def read() -> None:
                async for event in client.events():
                    if event.event == "chat" and event.payload.get("runId") == res["runId"]:
                        frames.append(event.payload)
                        if event.payload.get("state") in TERMINAL:
                            return

            await asyncio.wait_for(read(), 90)
            history = await client.chat_history(session_key="test-checkpoint")
            return [*frames, {"history": history}]

    *frames, last = asyncio.run(chat())
    assert frames[-1]["state"] == "final", frames[-1]
    assert frames[-1]["message"]["content"][0]["text"] == "Awake again, and I remember."
    assert [m["role"] for m in last["history"]] == ["user", "assistant"]
    assert any(r.path == "/ai/v1/chat/completions" for r in ai.requests)


def test_it_restores_faster_than_a_cold_start(
    local_backend: LocalBackend, gateway: Gateway
) -> None:
    g = gateway
    dumps, restores = [], list(g.figures.get("restore_s", []))
    for _ in range(3):
        image, dump_s, _ram = hibernate(local_backend, g)
        dumps.append(dump_s)
        restores.append(wake(local_backend, g, image))
        local_backend.drop_checkpoint(image.location)
    median = statistics.median(restores)
    print(
        f"\nrestore -> /readyz: median {median:.2f} s of {[round(s, 2) for s in restores]}; "
        f"dumps {[round(s, 2) for s in dumps]} s; cold start {g.cold_start_s:.1f} s"
    )
    assert median < g.cold_start_s, (restores, g.cold_start_s)


def test_it_pauses_and_resumes_a_sandbox(local_backend: LocalBackend, gateway: Gateway) -> None:
    g = gateway
    local_backend.freeze(g.spec, g.state)
    local_backend.freeze(g.spec, g.state)  # idempotent
    try:
        assert cgroups.is_frozen(g.state["cgroups"])
        with pytest.raises(OSError):
            readyz(g.state["host_port"], timeout=1)  # nothing runs to answer
    finally:
        local_backend.thaw(g.spec, g.state)
    assert not cgroups.is_frozen(g.state["cgroups"])
    assert readyz(g.state["host_port"]) == 200


def test_a_paused_sandbox_can_be_saved(local_backend: LocalBackend, gateway: Gateway) -> None:
    g = gateway
    local_backend.freeze(g.spec, g.state)
    image, _dump_s, _ram = hibernate(local_backend, g)
    assert_nothing_runs(local_backend, g)
    wake(local_backend, g, image)
    assert not cgroups.is_frozen(g.state["cgroups"])
    local_backend.drop_checkpoint(image.location)


def sandbox_sh(backend: LocalBackend, g: Gateway, script: str, *args: str) -> str:
    result = backend.exec(g.spec, g.state, ["sh", "-c", script, "sh", *args])
    assert result.exit_code == 0 and not result.timed_out, result
    return result.stdout


def sandbox_cmdlines(g: Gateway) -> dict[int, bytes]:
    """The sandbox's live processes and their NUL-separated command lines. A process that exits
    between the cgroup's listing and the read is left out: it is no longer there."""
    found = {}
    for pid in cgroups.pids(g.state["cgroups"]):
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
    return found


def kill_in_sandbox(backend: LocalBackend, g: Gateway, cmdline: bytes) -> None:
    """SIGKILL the sandbox's processes whose command line is ``cmdline`` (NUL-separated)."""
    for pid, line in sandbox_cmdlines(g).items():
        if line == cmdline:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                continue


def test_it_refuses_to_save_a_sandbox_holding_deleted_files(
    local_backend: LocalBackend, gateway: Gateway, tmp_path: Path
) -> None:
    """A held, deleted file whose directory became a link to a host directory: a restore (as
    root) would recreate the file there. The save is refused; the sandbox runs on untouched."""
    g = gateway
    victim = tmp_path / "host-dir"
    victim.mkdir(mode=0o755)
    os.utime(victim, (1_000_000_000, 1_000_000_000))
    before = victim.stat()
    sandbox_sh(
        local_backend,
        g,
        'mkdir -p "$1/d" && exec 3>"$1/d/f" && echo secret >&3\n'
        "sleep 1000 </dev/null >/dev/null 2>&1 &\n"
        'exec 3>&-; rm "$1/d/f" && rmdir "$1/d" && ln -s "$2" "$1/d"',
        str(g.spec.data_dir),
        str(victim),
    )
    images = set(local_backend.checkpoint_dir.glob("*"))  # other tests' images may be there
    try:
        with pytest.raises(BackendError, match="holds deleted files; it will be stopped instead"):
            local_backend.checkpoint(g.spec, g.state)
        assert list(victim.iterdir()) == []
        after = victim.stat()
        assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)
        assert local_backend.poll(g.spec, g.state).running
        assert not cgroups.is_frozen(g.state["cgroups"])
        assert readyz(g.state["host_port"]) == 200
        assert set(local_backend.checkpoint_dir.glob("*")) == images, "no image is left behind"
    finally:
        kill_in_sandbox(local_backend, g, b"sleep\x001000\x00")
        (g.spec.data_dir / "d").unlink(missing_ok=True)


def test_commands_run_in_a_sandbox_hold_no_capabilities(
    local_backend: LocalBackend, gateway: Gateway
) -> None:
    g = gateway
    status = dict(
        line.split(":", 1)
        for line in sandbox_sh(local_backend, g, "cat /proc/self/status").splitlines()
    )
    fields = {k: v.strip() for k, v in status.items()}
    for cap in ("CapBnd", "CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields[cap])
    assert (fields["NoNewPrivs"], fields["Seccomp"]) == ("1", "2")
    uid = str(g.state["uid"])
    assert fields["Uid"].split() == [uid] * 4 and fields["Gid"].split() == [uid] * 4
    assert fields["Groups"] == ""


def test_a_background_command_left_by_exec_is_saved_and_restored_privately(
    local_backend: LocalBackend, gateway: Gateway
) -> None:
    g = gateway
    sandbox_sh(local_backend, g, "sleep 1000 </dev/null >/dev/null 2>&1 &")
    try:
        image, _dump_s, _ram = hibernate(local_backend, g)
        assert_nothing_runs(local_backend, g)
        files = list(Path(image.location).iterdir())
        assert any(f.name.startswith("pages-") for f in files)
        for path in files:
            info = path.lstat()
            assert stat.S_ISREG(info.st_mode), path
            assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o600), path
        wake(local_backend, g, image)
        local_backend.drop_checkpoint(image.location)
        sleeping = [p for p, line in sandbox_cmdlines(g).items() if line == b"sleep\x001000\x00"]
        assert len(sleeping) == 1, "the background command was restored with the gateway"
    finally:
        kill_in_sandbox(local_backend, g, b"sleep\x001000\x00")


def test_a_timed_out_command_is_killed_with_what_it_left_behind(
    local_backend: LocalBackend, gateway: Gateway
) -> None:
    """The command's own session is inside the sandbox; a timeout still kills all of it, even
    a background child that outlived the command and holds its output."""
    g = gateway
    result = local_backend.exec(
        g.spec, g.state, ["sh", "-c", "sleep 1001 & sleep 1002 </dev/null >/dev/null 2>&1 &"], 2
    )
    assert result.timed_out
    left = [pid for pid, line in sandbox_cmdlines(g).items() if line.startswith(b"sleep\x00100")]
    assert left == []
    assert readyz(g.state["host_port"]) == 200, "the gateway is not in that session"


def test_it_refuses_a_replaced_data_dir_a_corrupt_image_and_a_missing_one(
    local_backend: LocalBackend, gateway: Gateway
) -> None:
    """Each refusal leaves nothing running, so the caller can start the sandbox cold."""
    g = gateway
    image, _dump_s, _ram = hibernate(local_backend, g)
    data = g.spec.data_dir
    # A data dir put back from a copy (a backup restore): same files, other inodes.
    original = data.with_name(data.name + ".original")
    data.rename(original)
    try:
        shutil.copytree(original, data, symlinks=True)
        assert local_backend.data_identity(g.spec) != image.identity
        with pytest.raises(BackendError, match="another copy"):
            run(local_backend.restore(g.spec, image))
        assert_nothing_runs(local_backend, g)
    finally:
        shutil.rmtree(data)
        original.rename(data)
    assert local_backend.data_identity(g.spec) == image.identity

    # A corrupt image: CRIU's process tree file overwritten.
    pstree = Path(image.location) / "pstree.img"
    pstree.write_bytes(os.urandom(pstree.stat().st_size or 64))
    with pytest.raises(BackendError, match="Could not restore"):
        run(local_backend.restore(g.spec, image))
    g.state = {}
    assert_nothing_runs(local_backend, g)

    # A missing one.
    local_backend.drop_checkpoint(image.location)
    with pytest.raises(BackendError, match="missing"):
        run(local_backend.restore(g.spec, image))
    assert_nothing_runs(local_backend, g)
