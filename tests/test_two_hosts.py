"""Two sandbox hosts on this machine: host 1 is the root namespace, host 2 a network namespace
with its own address (tests.netns), each with its own privileged Celery worker, AI gateway,
data dir, cgroups and sandbox uids, sharing PostgreSQL, Redis and the backup location.

* A user signed up while host 1 drains is placed on host 2; their agent boots there (a real
  OpenClaw gateway in a real sandbox, started by host 2's worker) and chats: the fake model's
  reply comes through host 2's own AI gateway, reached by the portal through host 2's edge.
* ``manage.py hosts drain <host 2>`` moves that agent to host 1 at its next sleep (a backup on
  host 2, a restore on host 1 at its next start), with its memory: the chat the portal shows
  there starts with what the user said on host 2, and the next reply comes through host 1's
  AI gateway.
* Killing host 2's worker (the machine lives on, and so does the agent's gateway there) and
  missing its heartbeats marks it lost; its user's agent comes back on host 1 from its latest
  snapshot, and an event says what may be lost: what was said after that snapshot is gone.
  When host 2's worker comes back, its host stays lost and it fences itself: the copy of the
  agent still running there is stopped and its data there removed, while host 1's chats on.

Real parts throughout: gateways in bubblewrap + pasta, real workers, real restic; only the
model is the fake server. Four cold boots in all (two per test), about 12 CPU-s each.

Host 2's worker enters the namespace's network only (``host_mounts``: ``ip netns exec`` would
hide /sys/fs/cgroup), and the namespace has a default route (pasta does not start on a machine
without a routable interface, even for a sandbox without internet).

Every chat is the user's own: the portal's chat consumer through the ASGI router, in this
process (the root namespace), which reaches a gateway on host 2 only through host 2's edge
(:func:`sandboxes.hostlink.gateway_url`): that gateway listens on host 2's loopback alone.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.core.management import call_command
from django.utils import timezone

from portal.asgi import application
from sandboxes import actions, hostlink, hosts, tasks
from sandboxes.backups import tasks as backup_tasks
from sandboxes.models import Sandbox, SandboxEvent, SandboxHost, Snapshot
from tests.factories import make_user
from tests.fakes.model_server import FakeModelServer
from tests.fixtures.chat import session_cookie
from tests.fixtures.live import ROOT, Server, ai_gateway_app, server_env
from tests.fixtures.live import test_database_url as served_database_url
from tests.fixtures.runtime import remove_cgroup_parent
from tests.netns import HostNamespace

SECRET = "two-hosts-link-secret-".ljust(40, "x")
HEARTBEAT = 1  # seconds, on both hosts
LOST_AFTER = 8  # seconds without a heartbeat before a host is lost
BOOT = 240  # seconds a cold boot (with a restore) may take on 2 busy cores
ORIGIN = b"http://testserver"
State = Sandbox.State
HostState = SandboxHost.State
Frame = dict[str, Any]


@dataclass
class TwoHosts:
    """Both hosts' names and processes (see the module docstring)."""

    host1: str
    host2: str
    ns: HostNamespace
    backup_dir: Path
    host2_data: Path
    host1_worker: Server
    host2_worker: subprocess.Popen[bytes]
    host2_logs: Path
    start_host2_worker: Callable[[str], subprocess.Popen[bytes]]  # its log's name -> process
    worker_log: str = "worker"

    def restart_host2_worker(self) -> None:
        """Start host 2's worker again (after it was killed), logging to worker-again.log."""
        self.worker_log = "worker-again"
        self.host2_worker = self.start_host2_worker(self.worker_log)

    def host2_output(self, name: str = "") -> str:
        name = name or self.worker_log
        path = self.host2_logs / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def output(self) -> str:
        return (
            f"-- host 1 worker:\n{self.host1_worker.output()[-4000:]}\n"
            f"-- host 2 worker:\n{self.host2_output()}"
        )


def _host2_env(
    ns: HostNamespace, host2: str, data: Path, backups: Path, dirs: dict[str, str]
) -> dict[str, str]:
    """Host 2's settings: its own name, address, data dir, cgroups, uids and checkpoints; the
    shared database, Redis, runtime build, Celery queue name and backup location."""
    pid = os.getpid()
    own = {
        "DATABASE_URL": ns.database_url(served_database_url()),
        "REDIS_URL": ns.redis_url(os.environ["REDIS_URL"]),
        "HERMIT_HOST_NAME": host2,
        "HERMIT_HOST_ADDRESS": ns.address,
        "HERMIT_DATA_DIR": str(data),
        "HERMIT_CGROUP_PARENT": f"hermit-t{pid}-h2",
        "HERMIT_UID_BASE": str(20_000_000 + (pid % 1000) * 10_000),
        "HERMIT_NET_UID_BASE": str(40_000_000 + (pid % 1000) * 10_000),
        "HERMIT_CHECKPOINT_DIR": str(data / "checkpoints"),
        "HERMIT_BACKUP_DIR": str(backups),
        "HERMIT_AI_GATEWAY_PORT": "8001",
        "HERMIT_HOST_LINK_SECRET": SECRET,
        "HERMIT_HOST_HEARTBEAT_INTERVAL": str(HEARTBEAT),
        "HERMIT_HOST_MIN_FREE_MB": "0",
    }
    return server_env(**{**dirs, **own})


def _wait(check: Callable[[], Any], timeout: float, what: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, what()
        time.sleep(0.5)
    return result


def _wait_inside(
    ns: HostNamespace, address: str, port: int, proc: Any, what: Callable[[], str]
) -> None:
    probe = f"import socket; socket.create_connection(({address!r}, {port}), 1).close()"

    def listening() -> bool:
        assert proc.poll() is None, what()
        return ns.run([sys.executable, "-c", probe]).returncode == 0

    _wait(listening, 60, what)


@pytest.fixture(scope="module")
def two_hosts(
    start_server: Callable[..., Server],
    sandbox_dirs: dict[str, str],
    celery_queue: str,
    sandbox_pool: Any,
    fake_model: FakeModelServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TwoHosts]:
    """Host 1's worker here; host 2's worker, AI gateway and edge in a network namespace."""
    pid = os.getpid()
    host1, host2 = f"h1-{pid}", f"h2-{pid}"
    base = Path(sandbox_dirs["HERMIT_DATA_DIR"])
    backups, host2_data = base / "shared-backups", base / "host2"
    backups.mkdir(mode=0o700, exist_ok=True)
    host2_data.mkdir(exist_ok=True)
    logs = tmp_path_factory.mktemp("host2")
    host1_worker = start_server(
        "celery",
        name="host1-worker",
        HERMIT_HOST_NAME=host1,
        HERMIT_AI_GATEWAY_PORT=str(sandbox_pool.ai_gateway.port),
        HERMIT_BACKUP_DIR=str(backups),
        HERMIT_HOST_LINK_SECRET=SECRET,
        HERMIT_HOST_HEARTBEAT_INTERVAL=str(HEARTBEAT),
        HERMIT_HOST_MIN_FREE_MB="0",
    )
    with HostNamespace() as ns:
        ns.route_default()  # pasta needs a routable interface, as on a real machine
        ns.share_loopback(fake_model.port)  # the model route's URL, read from the database
        env = _host2_env(ns, host2, host2_data, backups, sandbox_dirs)
        queue = hosts.queue_for(host2)

        def start_worker(log_name: str) -> subprocess.Popen[bytes]:
            return ns.popen(
                [sys.executable, "-m", "celery", "-A", "portal", "worker", "-l", "info",
                 "--concurrency", "2", "-Q", queue, "-n", f"{host2}@%h"],
                env=env, log=logs / f"{log_name}.log", cwd=ROOT, host_mounts=True,
            )  # fmt: skip

        worker = start_worker("worker")
        ai_gateway = ns.popen(
            [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "8001",
             "--lifespan", "on", ai_gateway_app()],
            env=env, log=logs / "ai-gateway.log", cwd=ROOT,
        )  # fmt: skip
        edge = ns.popen(
            [sys.executable, "-m", "hostedge"], env=env, log=logs / "edge.log", cwd=ROOT
        )
        setup = TwoHosts(
            host1, host2, ns, backups, host2_data, host1_worker, worker, logs, start_worker
        )
        _wait_inside(ns, "127.0.0.1", 8001, ai_gateway, lambda: setup.host2_output("ai-gateway"))
        _wait_inside(ns, ns.address, 8003, edge, lambda: setup.host2_output("edge"))
        try:
            yield setup
        finally:
            _end_session(setup.host2_worker)
            remove_cgroup_parent(Path("/sys/fs/cgroup"), env["HERMIT_CGROUP_PARENT"])
    host1_worker.stop()


def _host2_cgroups(name: str) -> list[Path]:
    """The cgroup directories of host 2's sandbox ``name`` that exist (v2: one; v1: one per
    controller)."""
    root, parent = Path("/sys/fs/cgroup"), f"hermit-t{os.getpid()}-h2"
    if (root / "cgroup.controllers").exists():
        candidates = [root / parent / name]
    else:
        candidates = [ctrl / parent / name for ctrl in root.iterdir() if not ctrl.is_symlink()]
    return [path for path in candidates if path.is_dir()]


def _end_session(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process's whole session (a machine that dies says no goodbye)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait(timeout=30)


@pytest.fixture
def both(two_hosts: TwoHosts, transactional_db: None, sandbox_pool: Any, settings: Any) -> TwoHosts:
    """The scenario's settings in this process (which acts for host 1), the shared rows, and
    both hosts registered again by their heartbeats (the database is emptied between tests)."""
    settings.HERMIT_HOST_NAME = two_hosts.host1
    settings.HERMIT_HOST_LINK_SECRET = [SECRET]
    settings.HERMIT_BACKUP_DIR = str(two_hosts.backup_dir)
    settings.HERMIT_HOST_LOST_AFTER = LOST_AFTER
    settings.HERMIT_HOST_MIN_FREE_MB = 0
    sandbox_pool.restore_shared()  # plans, the built runtime, the model routes

    def registered() -> bool:
        return (
            SandboxHost.objects.filter(
                name__in=[two_hosts.host1, two_hosts.host2], last_heartbeat__isnull=False
            ).count()
            == 2
        )

    _wait(registered, 90, two_hosts.output)
    return two_hosts


# -- chat as the user does: the portal's chat consumer -------------------------------------------


async def _portal_chat(cookie: str, text: str, timeout: float) -> tuple[list[Frame], str]:
    comm = WebsocketCommunicator(
        application,
        "/ws/chat/",
        headers=[(b"origin", ORIGIN), (b"host", b"testserver"), (b"cookie", cookie.encode())],
    )
    connected, code = await comm.connect(timeout=10)
    assert connected, code
    try:
        shown = await _frames_until(comm, "history", timeout)
        await comm.send_to(
            text_data=json.dumps({"type": "send", "id": uuid.uuid4().hex, "text": text})
        )
        final = (await _frames_until(comm, "final", timeout))[-1]
        return shown[-1]["messages"], final["text"]
    finally:
        await comm.disconnect()


async def _frames_until(comm: WebsocketCommunicator, kind: str, timeout: float) -> list[Frame]:
    frames: list[Frame] = []
    async with asyncio.timeout(timeout):
        while not frames or frames[-1].get("type") != kind:
            frames.append(json.loads(await comm.receive_from(timeout=timeout)))
            assert frames[-1].get("type") != "error", frames
    return frames


def say_through_portal(sandbox: Sandbox, text: str, timeout: float = 120) -> tuple[list[str], str]:
    """Open the owner's chat in the portal (the chat consumer, through the ASGI router), as
    the browser does; return the conversation it shows first, and the reply to ``text``."""
    cookie = session_cookie(sandbox.owner)
    messages, reply = asyncio.run(_portal_chat(cookie, text, timeout))
    return [m["text"] for m in messages], reply


# -- steps ---------------------------------------------------------------------------------------


def sign_up_on_host_2(setup: TwoHosts, email: str, settings: Any) -> Sandbox:
    """Sign ``email`` up and in while host 1 drains, so placement picks host 2 (the sign-in
    asks for the first start); wait until their agent runs there (booted by host 2's worker)."""
    call_command("hosts", "drain", setup.host1, stdout=io.StringIO())
    try:
        settings.HERMIT_AUTO_PROVISION = True
        user = make_user(email)  # a verified address, as after the confirmation link
        session_cookie(user)  # signs in: sandboxes.signals queues the first start
        sandbox = Sandbox.objects.get(owner=user)
        assert sandbox.events.filter(kind="queued").exists()
    finally:
        call_command("hosts", "undrain", setup.host1, stdout=io.StringIO())
    sandbox.refresh_from_db()
    assert sandbox.host is not None and sandbox.host.name == setup.host2
    wait_for(sandbox, State.RUNNING, setup)
    assert sandbox.host.name == setup.host2
    assert hostlink.is_remote(sandbox)
    return sandbox


def wait_for(sandbox: Sandbox, state: str, setup: TwoHosts, timeout: float = BOOT) -> None:
    def reached() -> bool:
        sandbox.refresh_from_db()
        assert sandbox.state != State.FAILED or state == State.FAILED, events_and(setup, sandbox)
        return sandbox.state == state

    _wait(reached, timeout, lambda: f"not {state}: " + events_and(setup, sandbox))


def events_and(setup: TwoHosts, sandbox: Sandbox) -> str:
    rows = SandboxEvent.objects.filter(sandbox=sandbox).order_by("pk")
    lines = [f"{e.kind} {e.state} {e.message}" for e in rows]
    return f"state {sandbox.state}; events:\n" + "\n".join(lines) + "\n" + setup.output()


def wake_on_host_1(setup: TwoHosts, sandbox: Sandbox) -> None:
    """Wake the moved agent: the task goes to host 1's queue, whose worker restores its data
    from the backup and boots it."""
    tasks.wake_sandbox.delay(sandbox.pk)
    wait_for(sandbox, State.RUNNING, setup)
    assert sandbox.host is not None and sandbox.host.name == setup.host1
    assert not hostlink.is_remote(sandbox)


def timeline(sandbox: Sandbox, since: float) -> str:
    """The sandbox's events from ``since`` (a time.monotonic() reading) on, each with its
    offset in seconds: where the time of a move and a wake goes."""
    start = timezone.now() - timedelta(seconds=time.monotonic() - since)
    rows = SandboxEvent.objects.filter(sandbox=sandbox, created_at__gte=start).order_by("pk")
    lines = [f"{(e.created_at - start).total_seconds():6.1f}s {e.kind}: {e.message}" for e in rows]
    return "\n".join(["", *lines])


def stop_here(sandbox: Sandbox) -> None:
    """Stop an agent left running on host 1 (the database is emptied after the test), queuing
    no backup of the stop: host 1's worker would take it while the database is flushed, and
    its routing query and the flush's table locks deadlock."""
    sandbox.refresh_from_db()
    here = sandbox.host is not None and sandbox.host.name == hosts.local_name()
    if here and sandbox.state in (State.RUNNING, State.DOZING, State.FAILED, State.STARTING):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(actions, "queue_backup", lambda *args, **kwargs: None)
            actions.stop_sandbox(sandbox)


# -- the scenario ----------------------------------------------------------------------------


def test_a_user_placed_on_host_2_chats_there_and_a_drain_moves_the_agent_with_its_memory(
    both: TwoHosts, model_server: FakeModelServer, settings: Any
) -> None:
    started = time.monotonic()
    sandbox = sign_up_on_host_2(both, "ada@two-hosts.test", settings)
    try:
        assert (both.host2_data / "sandboxes" / str(sandbox.pk)).is_dir()  # host 2's disk
        model_server.script(reply="Noted: your cat is called Ada.", chunks=2)
        before = len(model_server.requests)
        shown, reply = say_through_portal(sandbox, "Remember this: my cat is called Ada.")
        assert shown == [] and reply == "Noted: your cat is called Ada."
        assert len(model_server.requests) > before
        call = f"ai call user={sandbox.owner_id} sandbox={sandbox.pk} "

        def logged() -> bool:  # host 2's own AI gateway made the call (it logs once it ends)
            return call in both.host2_output("ai-gateway")

        _wait(logged, 30, lambda: both.host2_output("ai-gateway"))
        assert "status=200 outcome=ok" in both.host2_output("ai-gateway")
        booted = time.monotonic()

        out = io.StringIO()
        call_command("hosts", "drain", both.host2, stdout=out)
        assert f"{both.host2} is draining" in out.getvalue()
        assert "the other 1 move once they sleep" in out.getvalue(), out.getvalue()
        tasks.sleep_sandbox.delay(sandbox.pk)  # routed to host 2; the move follows the sleep

        def moved() -> bool:
            sandbox.refresh_from_db()
            if sandbox.host is not None and sandbox.host.name == both.host1:
                return True
            if sandbox.state == State.SLEEPING and not sandbox.backend_state:
                tasks.check_hosts()  # beat's pass: a move that met the sleep's backup again
            return False

        _wait(moved, 180, lambda: "not moved: " + events_and(both, sandbox))
        assert sandbox.state == State.SLEEPING
        assert not (both.host2_data / "sandboxes" / str(sandbox.pk)).exists()
        moves = SandboxEvent.objects.filter(sandbox=sandbox, message__startswith="Moved to")
        event = moves.latest("pk")  # the sleeping agent's state change onto host 1
        assert event.state == State.SLEEPING
        assert "its data comes back from its backup" in event.message, event.message
        assert Snapshot.objects.filter(sandbox=sandbox).exists()
        drained = time.monotonic()

        wake_on_host_1(both, sandbox)
        model_server.script(reply="Still here, on another machine.", chunks=1)
        shown, reply = say_through_portal(sandbox, "Are you still there?")
        assert shown[:2] == [
            "Remember this: my cat is called Ada.",
            "Noted: your cat is called Ada.",
        ]
        assert reply == "Still here, on another machine."
        calls = both.host2_output("ai-gateway")  # this one went through host 1's AI gateway
        assert calls.count(call) == 1, calls
        print(timeline(sandbox, since=booted))
        print(
            f"\ntwo hosts: boot on host 2 and chat {booted - started:.1f}s, "
            f"drain move {drained - booted:.1f}s, "
            f"restore and boot on host 1 {time.monotonic() - drained:.1f}s"
        )
    finally:
        stop_here(sandbox)
        call_command("hosts", "undrain", both.host2, stdout=io.StringIO())


def test_a_lost_host_2s_agent_comes_back_on_host_1_from_its_latest_snapshot(
    both: TwoHosts, model_server: FakeModelServer, settings: Any
) -> None:
    started = time.monotonic()
    sandbox = sign_up_on_host_2(both, "rex@two-hosts.test", settings)
    try:
        model_server.script(reply="Noted: your dog is called Rex.", chunks=1)
        _, reply = say_through_portal(sandbox, "Remember this: my dog is called Rex.")
        assert reply == "Noted: your dog is called Rex."
        backup_tasks.backup_sandbox.delay(sandbox.pk, Snapshot.Trigger.USER)  # on host 2
        snapshot = _wait(
            lambda: Snapshot.objects.filter(sandbox=sandbox).first(),
            120,
            lambda: "no snapshot: " + events_and(both, sandbox),
        )
        model_server.script(reply="Noted: your fish is called Nemo.", chunks=1)
        shown, reply = say_through_portal(sandbox, "And my fish is called Nemo.")
        assert shown[0] == "Remember this: my dog is called Rex."
        assert reply == "Noted: your fish is called Nemo."
        booted = time.monotonic()

        # Host 2's worker dies; the machine lives on, and so does the agent's gateway there.
        _end_session(both.host2_worker)
        stray = _host2_cgroups(sandbox.slug)
        assert stray and all((path / "cgroup.procs").read_text().split() for path in stray)
        host2_volume = both.host2_data / "sandboxes" / str(sandbox.pk)
        assert host2_volume.is_dir()
        assert tasks.check_hosts()["lost"] == 0  # its last heartbeat is recent still
        time.sleep(LOST_AFTER + HEARTBEAT)
        counts = tasks.check_hosts()  # beat's pass
        assert counts["lost"] == 1 and counts["relocated"] == 1, counts
        host2 = SandboxHost.objects.get(name=both.host2)
        assert host2.state == HostState.LOST
        sandbox.refresh_from_db()
        assert sandbox.host is not None and sandbox.host.name == both.host1
        assert sandbox.state == State.SLEEPING and sandbox.backend_state == {}
        event = SandboxEvent.objects.filter(sandbox=sandbox, kind="moved").latest("pk")
        taken = f"{snapshot.taken_at:%Y-%m-%d %H:%M} UTC"
        assert f"comes back from its backup of {taken}" in event.message, event.message
        assert "changes made since then may be lost" in event.message, event.message
        lost = time.monotonic()

        wake_on_host_1(both, sandbox)

        # Host 2's worker comes back: its host stays lost, and it fences what moved away.
        both.restart_host2_worker()
        fenced = _wait(
            lambda: SandboxEvent.objects.filter(sandbox=sandbox, kind="fenced").first(),
            120,
            lambda: "not fenced: " + events_and(both, sandbox),
        )
        assert f"Its old machine {both.host2} came back" in fenced.message, fenced.message
        assert not any(path.exists() for path in stray)  # its gateway went with its cgroups
        assert not host2_volume.exists()
        assert SandboxHost.objects.get(name=both.host2).state == HostState.LOST
        sandbox.refresh_from_db()
        assert sandbox.state == State.RUNNING and sandbox.host.name == both.host1
        model_server.script(reply="Welcome back.", chunks=1)
        said, reply = say_through_portal(sandbox, "Hello again.")
        assert "Remember this: my dog is called Rex." in said, said
        assert "And my fish is called Nemo." not in said, said  # said after the snapshot
        assert reply == "Welcome back."
        print(timeline(sandbox, since=booted))
        print(
            f"\ntwo hosts: boot on host 2, chat and backup {booted - started:.1f}s, "
            f"lost and relocated {lost - booted:.1f}s, "
            f"restore and boot on host 1 {time.monotonic() - lost:.1f}s"
        )
    finally:
        stop_here(sandbox)
