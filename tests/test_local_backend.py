"""The local backend: real OpenClaw gateways in real bubblewrap sandboxes.

Two gateway sandboxes are shared by the module (each costs ~8 s and ~1 GB); the memory, failure
and re-attach tests use cheap sandboxes whose command is a tiny Node HTTP server.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sandboxes.backends import cgroups
from sandboxes.backends.base import BackendError, ExecResult, SandboxSpec
from sandboxes.backends.local import LOG_NAME, LocalBackend, _open_log
from sandboxes.backends.seccomp import DENIED_X86_64
from sandboxes.openclaw.config import CONFIG_PATH, render_config
from sandboxes.openclaw.protocol import ClientInfo, DeviceIdentity, GatewayConnection
from sandboxes.openclaw.runtime import build_runtime, node_binary
from tests.fixtures.runtime import NODE_VERSION, OPENCLAW_VERSION, ROOT, make_gateway_spec

TOKEN = "test-gateway-token"
ADMIN_SCOPES = ("operator.read", "operator.write", "operator.admin")
AI_REPLY = b"hello from the hermit ai gateway"
TINY_SERVER = (
    "console.log('tiny server booting');"
    "require('http').createServer((q, s) => s.end('{\"ok\":true}'))"
    ".listen(18789, '127.0.0.1', () => console.log('tiny server listening'))"
)
PROBE = """
const net = require('net');
const targets = JSON.parse(process.argv[1]);
Promise.all(targets.map(([host, port]) => new Promise(done => {
  const s = net.connect({host, port, timeout: 3000});
  s.on('connect', () => { s.destroy(); done('open'); });
  s.on('timeout', () => { s.destroy(); done('timeout'); });
  s.on('error', e => done(e.code));
}))).then(r => console.log(JSON.stringify(r)));
"""


@dataclass
class Running:
    spec: SandboxSpec
    state: dict[str, Any]


class _AIHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(AI_REPLY)))
        self.end_headers()
        self.wfile.write(AI_REPLY)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def ai_port() -> Iterator[int]:
    """A stand-in for Hermit's AI gateway on a host loopback port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AIHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def start(backend: LocalBackend, spec: SandboxSpec) -> Running:
    state: dict[str, Any] = {}
    for progress in backend.start(spec):
        assert 0 <= progress.percent <= 100
        state = progress.state or state
    return Running(spec, state)


@pytest.fixture(scope="module")
def gateways(
    local_backend: LocalBackend,
    sandbox_root: Path,
    runtime_dir: Path,
    sandbox_ids: Iterator[int],
    ai_port: int,
) -> Iterator[list[Running]]:
    """Two real OpenClaw gateways in two sandboxes, started in parallel."""
    specs = [
        make_gateway_spec(sandbox_root, runtime_dir, next(sandbox_ids), ai_gateway_port=ai_port)
        for _ in range(2)
    ]
    results: dict[int, Running | BaseException] = {}

    def run(index: int) -> None:
        try:
            results[index] = start(local_backend, specs[index])
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    running = [r for r in results.values() if isinstance(r, Running)]
    errors = [r for r in results.values() if not isinstance(r, Running)]
    if errors:
        for r in running:
            local_backend.stop(r.spec, r.state)
        raise errors[0]
    yield [results[0], results[1]]  # type: ignore[list-item]
    for r in running:
        local_backend.stop(r.spec, r.state)


@pytest.fixture
def tiny(
    local_backend: LocalBackend,
    sandbox_root: Path,
    runtime_dir: Path,
    sandbox_ids: Iterator[int],
) -> Iterator[Running]:
    """A sandbox with a 128 MB limit running only a tiny Node HTTP server."""
    spec = tiny_spec(sandbox_root, runtime_dir, next(sandbox_ids), TINY_SERVER, memory_mb=128)
    running = start(local_backend, spec)
    yield running
    local_backend.stop(spec, running.state)


def tiny_spec(
    sandbox_root: Path, runtime_dir: Path, sandbox_id: int, script: str, **fields: Any
) -> SandboxSpec:
    data_dir = sandbox_root / f"data-{sandbox_id}"
    data_dir.mkdir()
    extra = {"command": [str(node_binary(runtime_dir)), "-e", script]}
    extra.update(fields.pop("extra", {}))
    return SandboxSpec(
        sandbox_id=sandbox_id,
        name=f"sbx-{sandbox_id}",
        data_dir=data_dir,
        runtime_dir=runtime_dir,
        env={"HOME": str(data_dir)},
        memory_mb=fields.pop("memory_mb", 256),
        cpu_millis=500,
        pids_max=64,
        extra=extra,
        **fields,
    )


def node(backend: LocalBackend, r: Running, script: str, *args: str) -> ExecResult:
    return backend.exec(
        r.spec, r.state, [str(node_binary(r.spec.runtime_dir)), "-e", script, *args]
    )


def probe(backend: LocalBackend, r: Running, targets: list[tuple[str, int]]) -> list[str]:
    result = node(backend, r, PROBE, json.dumps(targets))
    assert result.exit_code == 0, result.stderr
    return list(json.loads(result.stdout))


def host_addresses() -> list[str]:
    """The host's non-loopback IPv4 addresses."""
    out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True)
    return [
        info["local"]
        for link in json.loads(out.stdout)
        for info in link.get("addr_info", [])
        if not info["local"].startswith("127.")
    ]


def live_processes_mentioning(text: str) -> list[int]:
    """Host pids (not zombies) whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


# -- runtime image and config -----------------------------------------------------------------


def test_it_reuses_a_built_runtime_which_is_read_only(runtime_dir: Path) -> None:
    started = time.monotonic()
    again = build_runtime(runtime_dir.parent, OPENCLAW_VERSION, NODE_VERSION)
    assert again == runtime_dir
    assert time.monotonic() - started < 2, "a second build of the same versions is a no-op"
    manifest = json.loads((runtime_dir / "manifest.json").read_text())
    assert (manifest["openclaw_version"], manifest["node_version"]) == (
        OPENCLAW_VERSION,
        NODE_VERSION,
    )
    for path in (runtime_dir, node_binary(runtime_dir), runtime_dir / "manifest.json"):
        assert path.stat().st_mode & 0o222 == 0, f"{path} is writable"
        assert path.stat().st_mode & 0o004, f"{path} is not world-readable"


def test_it_keeps_secrets_out_of_the_config_file(
    local_backend: LocalBackend, gateways: list[Running]
) -> None:
    a = gateways[0]
    text = local_backend.exec(a.spec, a.state, ["cat", CONFIG_PATH]).stdout
    assert a.spec.env["OPENCLAW_GATEWAY_TOKEN"] not in text
    assert a.spec.env["HERMIT_AI_KEY"] not in text
    config = json.loads(text)
    assert config["gateway"]["auth"]["token"] == "${OPENCLAW_GATEWAY_TOKEN}"
    assert config["models"]["providers"]["hermit"]["apiKey"] == "${HERMIT_AI_KEY}"


def test_it_mounts_the_config_read_only_outside_the_data_dir(
    local_backend: LocalBackend, gateways: list[Running]
) -> None:
    a = gateways[0]
    assert a.spec.env["OPENCLAW_CONFIG_PATH"] == CONFIG_PATH
    assert not Path(CONFIG_PATH).is_relative_to(a.spec.data_dir)
    script = f"echo '{{}}' > {CONFIG_PATH}; mv {CONFIG_PATH} /etc/openclaw/moved"
    result = local_backend.exec(a.spec, a.state, ["sh", "-c", script])
    assert result.stderr.count("Read-only file system") == 2, result.stderr
    assert "gateway" in local_backend.exec(a.spec, a.state, ["cat", CONFIG_PATH]).stdout
    host = Path(a.state["run_dir"]) / "files" / "etc__openclaw__openclaw.json"
    assert (host.stat().st_uid, host.stat().st_gid, host.stat().st_mode & 0o777) == (
        0,
        a.state["uid"],
        0o640,
    )
    run_dir = Path(a.state["run_dir"])
    modes = {
        p: (p.stat().st_uid, p.stat().st_gid, p.stat().st_mode & 0o777)
        for p in (run_dir, run_dir / LOG_NAME)
    }
    assert modes == {run_dir: (0, a.state["uid"], 0o750), run_dir / LOG_NAME: (0, 0, 0o600)}


def test_it_rotates_a_large_log_at_start_and_keeps_one_old_copy(tmp_path: Path) -> None:
    log, old = tmp_path / LOG_NAME, tmp_path / f"{LOG_NAME}.1"
    log.write_text("small\n")
    os.chmod(log, 0o644)
    _open_log(tmp_path, max_bytes=100)
    assert log.read_text() == "small\n" and not old.exists()  # small: kept, appended to
    assert log.stat().st_mode & 0o777 == 0o600
    old.write_text("older\n")
    log.write_text("x" * 101)
    _open_log(tmp_path, max_bytes=100)
    assert old.read_text() == "x" * 101  # the oldest copy is gone
    assert log.read_text() == "" and log.stat().st_mode & 0o777 == 0o600
    (tmp_path / "elsewhere").write_text("")
    log.unlink()
    log.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        _open_log(tmp_path, max_bytes=100)


def test_it_refuses_a_default_model_it_does_not_offer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in the model list"):
        render_config(data_dir=tmp_path, ai_gateway_port=8001, models=["a"], default_model="b")


# -- two gateways ----------------------------------------------------------------------------


def test_it_runs_two_gateways_on_their_own_ports(
    local_backend: LocalBackend, gateways: list[Running]
) -> None:
    endpoints = [local_backend.endpoint(r.spec, r.state) for r in gateways]
    assert endpoints[0] != endpoints[1]
    for (host, port), r in zip(endpoints, gateways, strict=True):
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=5) as response:
            assert json.loads(response.read())["ready"] is True
        assert local_backend.poll(r.spec, r.state).running


async def test_it_auto_approves_the_portal_as_a_loopback_client(
    local_backend: LocalBackend, gateways: list[Running]
) -> None:
    host, port = local_backend.endpoint(gateways[0].spec, gateways[0].state)
    # The same client gets a device token from a bare gateway on loopback: seen through the
    # port forward, the portal must look exactly like that (a loopback client, auto-approved).
    info = ClientInfo(client_id="cli", mode="cli", scopes=ADMIN_SCOPES)
    conn = await GatewayConnection.open(
        f"ws://{host}:{port}",
        token=TOKEN,
        identity=DeviceIdentity.generate(),
        info=info,
        timeout=20,
    )
    try:
        assert conn.hello.protocol == 4
        assert conn.hello.device_token, "a loopback client with the token gets a device token"
    finally:
        await conn.close()


def test_it_hides_the_other_sandboxs_files(
    local_backend: LocalBackend, gateways: list[Running]
) -> None:
    a, b = gateways
    own = local_backend.exec(a.spec, a.state, ["cat", str(a.spec.data_dir / "logs/openclaw.log")])
    assert own.exit_code == 0 and "gateway" in own.stdout
    assert (b.spec.data_dir / "logs/openclaw.log").is_file()
    other = local_backend.exec(a.spec, a.state, ["cat", str(b.spec.data_dir / "logs/openclaw.log")])
    assert other.exit_code != 0
    assert "No such file" in other.stderr
    listing = local_backend.exec(a.spec, a.state, ["ls", str(b.spec.data_dir.parent)])
    assert b.spec.data_dir.name not in listing.stdout


def test_it_hides_the_other_sandboxs_processes(
    local_backend: LocalBackend, gateways: list[Running]
) -> None:
    a, b = gateways
    script = "for e in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $e; done 2>/dev/null"
    result = local_backend.exec(a.spec, a.state, ["sh", "-c", script])
    assert f"HERMIT_AI_KEY={a.spec.env['HERMIT_AI_KEY']}" in result.stdout
    assert b.spec.env["HERMIT_AI_KEY"] not in result.stdout
    pids = local_backend.exec(a.spec, a.state, ["sh", "-c", "ls -d /proc/[0-9]*"]).stdout.split()
    assert "/proc/1" in pids
    # Inside: its own processes (its cgroup holds those plus pasta and bwrap) and the sh and ls
    # just run. B's gateway alone is four processes, so none of them can be among these.
    assert len(pids) <= len(local_backend.processes(a.spec, a.state)) + 2, pids


def fd_targets(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


def test_it_hands_none_of_pastas_sockets_to_the_sandbox(
    local_backend: LocalBackend, gateways: list[Running]
) -> None:
    a = gateways[0]
    pasta = a.state["pasta"][0]
    # pasta's sockets include the host-side listener of the port forward (host netns).
    pasta_sockets = {t for t in fd_targets(pasta) if t.startswith("socket:")}
    assert pasta_sockets
    for process in local_backend.processes(a.spec, a.state):
        if process.pid != pasta:
            assert not fd_targets(process.pid) & pasta_sockets, process.command
    assert os.readlink(f"/proc/{a.state['main'][0]}/fd/2").endswith("gateway.log")


def test_it_cannot_connect_to_the_other_sandbox(
    local_backend: LocalBackend, gateways: list[Running]
) -> None:
    a, b = gateways
    _, b_port = local_backend.endpoint(b.spec, b.state)
    targets = [("127.0.0.1", b_port)] + [(ip, b_port) for ip in host_addresses()]
    assert all(result != "open" for result in probe(local_backend, a, targets))
    assert probe(local_backend, a, [("127.0.0.1", 18789)]) == ["open"]  # its own gateway


def test_it_blocks_host_loopback_services_but_reaches_the_ai_gateway(
    local_backend: LocalBackend, gateways: list[Running], ai_port: int
) -> None:
    a = gateways[0]
    blocked = [("127.0.0.1", 5432), ("127.0.0.1", 6379), ("::1", 6379)]
    blocked += [(ip, port) for ip in host_addresses() for port in (5432, 6379, ai_port)]
    results = probe(local_backend, a, blocked)
    assert all(result != "open" for result in results), list(zip(blocked, results, strict=True))
    fetch = (
        "require('http').get(process.argv[1], r => { let b = '';"
        " r.on('data', d => b += d); r.on('end', () => console.log(r.statusCode, b)); })"
    )
    result = node(local_backend, a, fetch, f"http://127.0.0.1:{ai_port}/ai/v1/models")
    assert result.stdout.strip() == f"200 {AI_REPLY.decode()}", result.stderr


LOOPBACK_OR_ANY_V6 = {"0" * 32, "0" * 24 + "01000000"}  # ::, ::1 as /proc/net/tcp6 writes them


@dataclass(frozen=True)
class Sock:
    table: str  # tcp, tcp6, udp, udp6
    address: str  # hex, as the kernel writes it
    port: int
    state: str  # 0A: TCP listening; 07: UDP unconnected
    inode: int

    @property
    def on_loopback_or_any(self) -> bool:
        if self.table.endswith("6"):
            return self.address in LOOPBACK_OR_ANY_V6
        return self.address == "00000000" or self.address.endswith("7F")  # 0.0.0.0, 127/8

    @property
    def listening(self) -> bool:
        return self.state == ("0A" if self.table.startswith("tcp") else "07")


def sockets(net: Path) -> list[Sock]:
    """Every TCP and UDP socket of one network namespace (``net``: a /proc/<pid>/net dir)."""
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in (net / table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            found.append(Sock(table, address, int(port, 16), fields[3], int(fields[9])))
    return found


def socket_inodes(pid: int) -> set[int]:
    return {int(t[8:-1]) for t in fd_targets(pid) if t.startswith("socket:[")}


UDP_PROBE = """
import json, select, socket, sys, time
targets, inbound_port = json.loads(sys.argv[1]), int(sys.argv[2])
inbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
inbound.bind(("127.0.0.1", inbound_port))
out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
got, deadline = [], time.monotonic() + 4
while time.monotonic() < deadline:
    for port in targets:
        try:
            out.sendto(b"ping from the sandbox", ("127.0.0.1", port))
        except OSError:
            pass
    for sock in select.select([inbound, out], [], [], 0.5)[0]:
        got.append(sock.recvfrom(100)[0].decode(errors="replace"))
print(json.dumps(got))
"""


@pytest.fixture
def host_listeners() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP listener on the portal's port 8000 (unless taken) and a UDP echo server on loopback.

    Yields (the echo server's port, the datagrams it has received).
    """
    tcp = socket.socket()
    with contextlib.suppress(OSError):
        tcp.bind(("127.0.0.1", 8000))
        tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.2)
    received: list[bytes] = []
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                data, peer = udp.recvfrom(100)
                received.append(data)
                udp.sendto(data, peer)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    yield udp.getsockname()[1], received
    stop.set()
    thread.join()
    udp.close()
    tcp.close()


def test_it_reaches_no_host_port_but_the_ai_gateway(
    local_backend: LocalBackend,
    sandbox_root: Path,
    runtime_dir: Path,
    sandbox_ids: Iterator[int],
    ai_port: int,
    host_listeners: tuple[int, list[bytes]],
) -> None:
    # Started after the host's listeners, so that pasta's "auto" forwarding (were it on)
    # would find them.
    spec = tiny_spec(
        sandbox_root, runtime_dir, next(sandbox_ids), TINY_SERVER, ai_gateway_port=ai_port
    )
    a = start(local_backend, spec)
    try:
        check_no_host_port_but_the_ai_gateway(local_backend, a, ai_port, *host_listeners)
    finally:
        local_backend.stop(spec, a.state)


def check_no_host_port_but_the_ai_gateway(
    local_backend: LocalBackend, a: Running, ai_port: int, echo_port: int, echoed: list[bytes]
) -> None:
    pasta = socket_inodes(a.state["pasta"][0])
    inside = sockets(Path(f"/proc/{a.state['init'][0]}/net"))
    host = sockets(Path("/proc/self/net"))
    # pasta's sockets: in the sandbox, one listener per forward out (only the AI gateway); on
    # the host, the gateway's forward in; no UDP socket on either side.
    assert {s.port for s in inside if s.inode in pasta and s.listening} == {ai_port}
    assert {(s.address, s.port) for s in host if s.inode in pasta and s.listening} == {
        ("0100007F", a.state["host_port"])
    }
    assert [s for s in inside + host if s.inode in pasta and s.table.startswith("udp")] == []
    # pasta's "auto" forwards whatever is bound at its start (and, in some versions, later):
    # its command line must name each forward and turn UDP off both ways.
    argv = Path(f"/proc/{a.state['pasta'][0]}/cmdline").read_text().split("\0")
    options = dict(itertools.pairwise(argv))
    assert options["--tcp-ns"] == str(ai_port)
    assert options["--tcp-ports"] == f"127.0.0.1/{a.state['host_port']}:{a.spec.gateway_port}"
    assert (options["--udp-ports"], options["--udp-ns"]) == ("none", "none")
    assert not {"-t", "-u", "-T", "-U"} & set(argv)
    # Every port the host listens on (loopback or any address), tried from inside, except
    # those the sandbox itself listens on (its gateway).
    own = {s.port for s in inside if s.listening and s.inode not in pasta}
    tcp_ports = sorted(
        {s.port for s in host if s.table.startswith("tcp") and s.listening and s.on_loopback_or_any}
        - own
    )
    udp_ports = sorted(
        {s.port for s in host if s.table.startswith("udp") and s.listening and s.on_loopback_or_any}
    )
    assert ai_port in tcp_ports and 8000 in tcp_ports and echo_port in udp_ports
    targets = [(ip, port) for port in tcp_ports for ip in ("127.0.0.1", "::1")]
    results = probe(local_backend, a, targets)
    reached = {target for target, result in zip(targets, results, strict=True) if result == "open"}
    assert {port for _, port in reached} == {ai_port}, reached
    # UDP, both ways: the sandbox sends to every host UDP port (an echo server among them)
    # and waits on a port of its own, to which the host sends.
    inbound = free_udp_port()
    sender = threading.Thread(target=send_udp, args=(inbound, 5.0), daemon=True)
    sender.start()
    argv = ["python3", "-c", UDP_PROBE, json.dumps(udp_ports), str(inbound)]
    result = local_backend.exec(a.spec, a.state, argv)
    sender.join()
    assert result.exit_code == 0, result.stderr
    assert (json.loads(result.stdout), echoed) == ([], [])


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def send_udp(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                sock.sendto(b"ping from the host", ("127.0.0.1", port))
            time.sleep(0.2)


CANARIES = {
    "DATABASE_URL": "postgres://hermit:canary-db-password@127.0.0.1/hermit",
    "REDIS_URL": "redis://:canary-redis-password@127.0.0.1:6379/0",
    "SECRET_KEY": "canary-secret-key",
    "HERMIT_ENCRYPTION_KEYS": "canary-encryption-key",
    "STRIPE_SECRET_KEY": "sk_live_canary",
}


def test_it_gives_the_sandbox_none_of_the_portals_environment(
    local_backend: LocalBackend,
    sandbox_root: Path,
    runtime_dir: Path,
    sandbox_ids: Iterator[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    spec = tiny_spec(sandbox_root, runtime_dir, next(sandbox_ids), TINY_SERVER)
    r = start(local_backend, spec)
    try:
        pids = [r.state["supervisor"][0], *(p.pid for p in local_backend.processes(spec, r.state))]
        environs = {pid: Path(f"/proc/{pid}/environ").read_bytes() for pid in pids}
        inside = local_backend.exec(spec, r.state, ["sh", "-c", "env; cat /proc/[0-9]*/environ"])
    finally:
        local_backend.stop(spec, r.state)
    assert len(environs) >= 5, "supervisor, pasta, bwrap, init and the server"
    assert all(b"PATH=" in env for env in environs.values())
    assert "PATH=" in inside.stdout
    for text in [inside.stdout, *(env.decode(errors="replace") for env in environs.values())]:
        assert "canary" not in text


def test_it_allows_writes_only_to_its_data_dir_and_tmp(
    local_backend: LocalBackend, gateways: list[Running]
) -> None:
    a, b = gateways
    data = a.spec.data_dir
    writable = [data / "probe", data / "state" / "probe", Path("/tmp/probe")]
    read_only = [
        Path("/probe"),
        Path("/usr/local/probe"),
        Path("/etc/probe"),
        Path("/dev/probe"),
        a.spec.runtime_dir / "probe",
        data.parent / "probe",
        b.spec.data_dir / "probe",
    ]
    script = 'for p in "$@"; do if echo x > "$p"; then echo "ok $p"; else echo "no $p"; fi; done'
    paths = [str(p) for p in writable + read_only]
    result = local_backend.exec(a.spec, a.state, ["sh", "-c", script, "sh", *paths])
    verdicts = dict(line.split(" ", 1)[::-1] for line in result.stdout.splitlines())
    assert {str(p): "ok" for p in writable}.items() <= verdicts.items(), verdicts
    assert {str(p): "no" for p in read_only}.items() <= verdicts.items(), verdicts
    append = local_backend.exec(a.spec, a.state, ["sh", "-c", "echo x >> /etc/passwd"])
    assert append.exit_code != 0
    assert (data / "probe").stat().st_uid == a.state["uid"], "files belong to the sandbox uid"


def test_it_reports_processes_logs_and_stats(
    local_backend: LocalBackend, gateways: list[Running]
) -> None:
    a = gateways[0]
    processes = local_backend.processes(a.spec, a.state)
    node_path = str(node_binary(a.spec.runtime_dir))
    assert any(
        p.command.startswith(f"{node_path} ") and "gateway run" in p.command for p in processes
    )
    assert sum(p.rss_bytes for p in processes) > 300 * 1024 * 1024
    assert "[gateway]" in local_backend.logs(a.spec, a.state, lines=200)
    stats = local_backend.stats(a.spec, a.state)
    assert stats.memory_limit_bytes == 1536 * 1024 * 1024
    assert 200 * 1024 * 1024 < stats.memory_bytes < stats.memory_limit_bytes
    assert stats.cpu_seconds > 1
    assert stats.disk_bytes > 0
    assert stats.oom_kills == 0


def default_gateway() -> str:
    out = subprocess.run(["ip", "-j", "-4", "route"], capture_output=True, text=True, check=True)
    return next(r["gateway"] for r in json.loads(out.stdout) if r.get("dst") == "default")


@pytest.fixture
def host_only_service() -> Iterator[tuple[str, int]]:
    """A listener on an extra address of the host (like a Docker bridge), not on loopback."""
    address = f"198.18.{random.randint(1, 254)}.{random.randint(1, 254)}"
    subprocess.run(["ip", "address", "add", f"{address}/32", "dev", "lo"], check=True)
    try:
        with socket.create_server((address, 0)) as server:
            yield address, server.getsockname()[1]
    finally:
        subprocess.run(["ip", "address", "del", f"{address}/32", "dev", "lo"], check=True)


def test_it_keeps_host_services_closed_when_internet_is_on(
    local_backend: LocalBackend,
    sandbox_root: Path,
    runtime_dir: Path,
    sandbox_ids: Iterator[int],
    ai_port: int,
    host_only_service: tuple[str, int],
) -> None:
    with socket.create_connection(host_only_service, timeout=3):
        pass  # the host itself reaches it
    spec = tiny_spec(
        sandbox_root,
        runtime_dir,
        next(sandbox_ids),
        TINY_SERVER,
        internet=True,
        ai_gateway_port=ai_port,
    )
    r = start(local_backend, spec)
    try:
        routes = local_backend.exec(spec, r.state, ["ip", "route"]).stdout
        assert "default via" in routes, "with internet the namespace has a default route"
        assert "prohibit 169.254.169.254" in routes, "cloud metadata is blocked"
        # pasta would NAT the gateway address to the host's loopback without --no-map-gw, and
        # would connect to the host's other addresses without the prohibit routes.
        gateway = default_gateway()
        blocked = [("127.0.0.1", 5432), ("127.0.0.1", 6379), (gateway, 5432), (gateway, 6379)]
        blocked += [(ip, port) for ip in host_addresses() for port in (5432, 6379)]
        blocked += [host_only_service]
        results = probe(local_backend, r, blocked)
        assert all(result != "open" for result in results), list(zip(blocked, results, strict=True))
        assert results[-1] == "EACCES"
        assert probe(local_backend, r, [("127.0.0.1", ai_port)]) == ["open"]
        undo = ["ip", "route", "del", "prohibit", host_only_service[0]]
        assert local_backend.exec(spec, r.state, undo).exit_code != 0, "the sandbox cannot undo it"
    finally:
        local_backend.stop(spec, r.state)


def test_it_has_no_route_out_when_internet_is_off(
    local_backend: LocalBackend, gateways: list[Running]
) -> None:
    a = gateways[0]
    assert local_backend.exec(a.spec, a.state, ["ip", "route"]).stdout.strip() == ""
    assert probe(local_backend, a, [(default_gateway(), 53), ("198.51.100.1", 80)]) == [
        "ENETUNREACH",
        "ENETUNREACH",
    ]


# -- limits ----------------------------------------------------------------------------------


def test_it_kills_a_process_that_allocates_past_the_memory_limit(
    local_backend: LocalBackend, tiny: Running
) -> None:
    hog = "const k = []; for (let i = 0; i < 64; i++) k.push(Buffer.alloc(16 << 20).fill(1));"
    result = node(local_backend, tiny, hog)
    assert result.exit_code in (-9, 137), (result.exit_code, result.stderr)
    poll = local_backend.poll(tiny.spec, tiny.state)
    assert poll.running, "the allocator is the victim, not the sandbox's server"
    assert poll.oom_killed
    assert "memory limit" in poll.detail
    assert local_backend.stats(tiny.spec, tiny.state).oom_kills >= 1


def test_it_caps_the_number_of_processes(local_backend: LocalBackend, tiny: Running) -> None:
    script = "for i in $(seq 100); do sleep 2 & done; wait; echo all started"
    result = local_backend.exec(tiny.spec, tiny.state, ["sh", "-c", script], timeout=20)
    assert "fork" in result.stderr.lower(), result
    assert "all started" not in result.stdout


def test_it_caps_cpu_time(local_backend: LocalBackend, tiny: Running) -> None:
    busy = (
        "const end = Date.now() + 2000; while (Date.now() < end) {}"
        "const u = process.cpuUsage(); console.log((u.user + u.system) / 1e6);"
    )
    result = node(local_backend, tiny, busy)
    assert float(result.stdout) < 1.4, "half a core for 2 s is about 1 s of CPU"


# Every syscall the filter must deny, written out here (not read from seccomp.py, so that taking
# one off the table fails this test), with arguments that make it fail with an error other than
# EPERM, or succeed, when it is not filtered (see the baseline in the test).
DENIED_PROBES: dict[str, list[int | str]] = {
    "uselib": [134, 0],
    "ustat": [136, 0, 0],
    "sysfs": [139, 99],
    "_sysctl": [156, 0],
    "adjtimex": [159, 0],
    "acct": [163, 0],
    "settimeofday": [164, 1, 0],
    "swapon": [167, 0, 0],
    "swapoff": [168, 0],
    "reboot": [169, 0, 0, 0, 0],
    "iopl": [172, 4],
    "ioperm": [173, 0, 65537, 0],
    "init_module": [175, 0, 0, 0],
    "delete_module": [176, 0, 0],
    "quotactl": [179, 255, 0, 0, 0],
    "lookup_dcookie": [212, 0, 0, 0],
    "clock_settime": [227, 0, 0],
    "kexec_load": [246, 0, 0, 0, 0],
    "add_key": [248, 0, 0, 0, 0, 0],
    "request_key": [249, 0, 0, 0, 0],
    "keyctl": [250, 9999],
    "perf_event_open": [298, 0, 0, -1, -1, 0],
    "fanotify_init": [300, 0x200, 0],  # FAN_REPORT_FID: allowed unprivileged
    "name_to_handle_at": [303, -100, 0, 0, 0, 0],
    "open_by_handle_at": [304, -1, 0, 0],
    "clock_adjtime": [305, 9999, 0],
    "process_vm_readv": [310, "pid", 0, 0, 0, 0, 0],
    "process_vm_writev": [311, "pid", 0, 0, 0, 0, 0],
    "kcmp": [312, "pid", "pid", 99, 0, 0],
    "finit_module": [313, -1, 0, 0],
    "kexec_file_load": [320, -1, -1, 0, 0, 0],
    "bpf": [321, 9999, 0, 0],
    "userfaultfd": [323, 1],  # UFFD_USER_MODE_ONLY: allowed unprivileged
    "io_uring_setup": [425, 1, 0],
    "io_uring_enter": [426, -1, 0, 0, 0, 0, 0],
    "io_uring_register": [427, -1, 0, 0, 0],
}
# Only capabilities deny these too (an unprivileged caller gets EPERM with or without the filter).
DENIED_BY_CAPABILITIES_TOO = {"acct", "swapon", "swapoff", "reboot"}
# Prints {name: "ok" | strerror}: each call above, getpid, and getpid through the i386 ABI
# (int 0x80, from a code page) and the x32 ABI (number | 0x40000000).
SYSCALL_PROBE = """
import ctypes, json, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
verdicts = {}
calls = {**json.loads(sys.argv[1]), "getpid": [39], "x32 getpid": [39 | 0x40000000]}
for name, args in calls.items():
    args = [os.getpid() if a == "pid" else a for a in args]
    ctypes.set_errno(0)
    result = libc.syscall(*[ctypes.c_long(a) for a in args])
    verdicts[name] = os.strerror(ctypes.get_errno()) if result < 0 else "ok"
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3]))  # mov eax, 20; int 0x80; ret
result = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
verdicts["i386 getpid"] = "ok" if result > 0 else os.strerror(-result)
print("verdicts", json.dumps(verdicts), flush=True)
"""
EPERM_TEXT = os.strerror(errno.EPERM)


def probe_syscalls(run: Callable[[list[str]], str]) -> dict[str, str]:
    """Run SYSCALL_PROBE through ``run(argv) -> output``; return its verdicts."""
    calls = {**{name: [nr] for name, nr in DENIED_X86_64.items()}, **DENIED_PROBES}
    output = run(["python3", "-c", SYSCALL_PROBE, json.dumps(calls)])
    line = next(ln for ln in output.splitlines() if ln.startswith("verdicts "))
    return dict(json.loads(line.split(" ", 1)[1]))


def test_it_denies_risky_syscalls_to_the_sandboxs_processes(
    local_backend: LocalBackend, sandbox_root: Path, runtime_dir: Path, sandbox_ids: Iterator[int]
) -> None:
    assert {n: a[0] for n, a in DENIED_PROBES.items()}.items() <= DENIED_X86_64.items()
    spec = tiny_spec(sandbox_root, runtime_dir, next(sandbox_ids), TINY_SERVER)
    # The gateway's own process tree probes first, then serves.
    calls = json.dumps({**{name: [nr] for name, nr in DENIED_X86_64.items()}, **DENIED_PROBES})
    script = 'python3 -c "$0" "$1"; exec "$2" -e "$3"'
    node_path = str(node_binary(runtime_dir))
    spec.extra["command"] = ["sh", "-c", script, SYSCALL_PROBE, calls, node_path, TINY_SERVER]
    r = start(local_backend, spec)
    try:
        status = Path(f"/proc/{r.state['main'][0]}/status").read_text()
        assert "Seccomp:\t2" in status, "the gateway runs under a seccomp filter"
        in_main = probe_syscalls(lambda argv: local_backend.logs(spec, r.state))
        in_exec = probe_syscalls(lambda argv: local_backend.exec(spec, r.state, argv).stdout)
    finally:
        local_backend.stop(spec, r.state)
    uid = str(local_backend.uid_base + next(sandbox_ids))
    unprivileged = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    baseline = probe_syscalls(
        lambda argv: (
            subprocess.run(
                [*unprivileged, "/usr/bin/python3", *argv[1:]], capture_output=True, text=True
            ).stdout
        )
    )
    probed = {*DENIED_X86_64, *DENIED_PROBES, "i386 getpid", "x32 getpid"}
    for verdicts in (in_main, in_exec, baseline):
        assert verdicts.pop("getpid") == "ok"
        assert set(verdicts) == probed
    assert in_main == dict.fromkeys(probed, EPERM_TEXT), in_main
    assert in_exec == dict.fromkeys(probed, EPERM_TEXT), in_exec
    # Unfiltered, almost all of them fail otherwise or succeed: the filter is what denies them.
    filtered_only = {name for name, verdict in baseline.items() if verdict != EPERM_TEXT}
    assert filtered_only >= {"process_vm_readv", "process_vm_writev", "i386 getpid", "x32 getpid"}
    assert len(filtered_only) >= len(probed) - 2 * len(DENIED_BY_CAPABILITIES_TOO), baseline


def test_it_forbids_new_user_namespaces(
    local_backend: LocalBackend, sandbox_root: Path, runtime_dir: Path, sandbox_ids: Iterator[int]
) -> None:
    spec = tiny_spec(sandbox_root, runtime_dir, next(sandbox_ids), TINY_SERVER)
    attempt = "unshare --user --map-root-user true && echo userns made || echo userns refused"
    node_path = str(node_binary(runtime_dir))
    spec.extra["command"] = ["sh", "-c", f'{attempt}; exec "$0" -e "$1"', node_path, TINY_SERVER]
    r = start(local_backend, spec)
    try:
        by_gateway = [ln for ln in local_backend.logs(spec, r.state).splitlines() if "userns" in ln]
        by_exec = local_backend.exec(spec, r.state, ["sh", "-c", attempt]).stdout.strip()
    finally:
        local_backend.stop(spec, r.state)
    assert (by_gateway, by_exec) == (["userns refused"], "userns refused")
    uid = r.state["uid"]
    outside = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sh", "-c", attempt],
        capture_output=True,
        text=True,
    )
    assert outside.stdout.strip() == "userns made", "the host lets this uid make one"


def test_it_times_out_a_command(local_backend: LocalBackend, tiny: Running) -> None:
    result = local_backend.exec(tiny.spec, tiny.state, ["sleep", "30"], timeout=1)
    assert result.timed_out
    assert live_processes_mentioning("sleep 30") == []


# -- re-attach -------------------------------------------------------------------------------

CHILD = """
import json, sys
from pathlib import Path
from sandboxes.backends.base import SandboxSpec
from sandboxes.backends.local import LocalBackend
from sandboxes.backends.seccomp import DENIED_X86_64
args = json.loads(sys.argv[1])
spec = SandboxSpec(**{**args["spec"], "data_dir": Path(args["spec"]["data_dir"]),
                      "runtime_dir": Path(args["spec"]["runtime_dir"])})
backend = LocalBackend(run_root=Path(args["run_root"]), cgroup_parent=args["cgroup_parent"])
if args["action"] == "start":
    state = {}
    for progress in backend.start(spec):
        state = progress.state or state
    print(json.dumps(state))
else:
    state = args["state"]
    before = backend.poll(spec, state).running
    result = backend.exec(spec, state, ["sh", "-c", "echo hello from $(hostname)"])
    backend.stop(spec, state)
    after = backend.poll(spec, state).running
    print(json.dumps({"before": before, "stdout": result.stdout, "after": after}))
"""


def run_child(backend: LocalBackend, spec: SandboxSpec, action: str, **more: Any) -> Any:
    spec_fields = {k: v for k, v in spec.__dict__.items()}
    spec_fields["data_dir"] = str(spec.data_dir)
    spec_fields["runtime_dir"] = str(spec.runtime_dir)
    args = {
        "spec": spec_fields,
        "run_root": str(backend.run_root),
        "cgroup_parent": backend.cgroup_parent,
        "action": action,
        **more,
    }
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_it_reattaches_from_another_process(
    local_backend: LocalBackend, sandbox_root: Path, runtime_dir: Path, sandbox_ids: Iterator[int]
) -> None:
    spec = tiny_spec(sandbox_root, runtime_dir, next(sandbox_ids), TINY_SERVER)
    state = run_child(local_backend, spec, "start")  # that process has exited now
    try:
        assert local_backend.poll(spec, state).running
        report = run_child(local_backend, spec, "stop", state=state)
        assert report == {"before": True, "stdout": f"hello from {spec.name}\n", "after": False}
        assert not local_backend.poll(spec, state).running
        assert cgroups.pids(state["cgroups"]) == []
        assert live_processes_mentioning(str(spec.data_dir)) == []
    finally:
        local_backend.stop(spec, state)


# -- failures --------------------------------------------------------------------------------


def test_it_explains_a_missing_bubblewrap(
    local_backend: LocalBackend, sandbox_root: Path, runtime_dir: Path, sandbox_ids: Iterator[int]
) -> None:
    backend = LocalBackend(
        bwrap="/nonexistent/bwrap",
        run_root=local_backend.run_root,
        cgroup_parent=local_backend.cgroup_parent,
    )
    spec = tiny_spec(sandbox_root, runtime_dir, next(sandbox_ids), TINY_SERVER)
    with pytest.raises(BackendError, match=r"bubblewrap \(bwrap\) was not found at /nonexistent"):
        list(backend.start(spec))
    assert not Path(backend.cgroup_root, "memory", backend.cgroup_parent, spec.name).exists()


def test_it_explains_a_port_that_never_opens(
    local_backend: LocalBackend, sandbox_root: Path, runtime_dir: Path, sandbox_ids: Iterator[int]
) -> None:
    script = "console.error('pretend failure: cannot bind'); setInterval(() => {}, 1000)"
    spec = tiny_spec(
        sandbox_root, runtime_dir, next(sandbox_ids), script, extra={"start_timeout": 3}
    )
    with pytest.raises(BackendError) as caught:
        list(local_backend.start(spec))
    message = str(caught.value)
    assert "did not open port 18789 within 3 s" in message
    assert "Last log lines:\npretend failure: cannot bind" in message
    assert live_processes_mentioning(str(spec.data_dir)) == []
    assert not Path(
        local_backend.cgroup_root, "memory", local_backend.cgroup_parent, spec.name
    ).exists()


def test_it_explains_a_sandbox_that_exits_at_once(
    local_backend: LocalBackend, sandbox_root: Path, runtime_dir: Path, sandbox_ids: Iterator[int]
) -> None:
    script = "console.error('config is broken'); process.exit(3)"
    spec = tiny_spec(sandbox_root, runtime_dir, next(sandbox_ids), script)
    with pytest.raises(BackendError, match=r"(?s)exit code 3.*config is broken"):
        list(local_backend.start(spec))
    assert live_processes_mentioning(str(spec.data_dir)) == []


def test_it_lists_its_checkpoint_images_for_the_orphan_sweep(tmp_path: Path) -> None:
    from sandboxes.backends.local import LocalBackend

    backend = LocalBackend(run_root=tmp_path / "run", checkpoint_dir=tmp_path / "ckpt")
    assert backend.list_checkpoints() == []  # no directory yet
    (tmp_path / "ckpt").mkdir()
    image = tmp_path / "ckpt" / "sbx-2001-20261123T051500-k3j_x9"
    image.mkdir()
    (tmp_path / "ckpt" / "stray-file").write_text("not an image")
    (tmp_path / "ckpt" / "sbx-7-20261123T051500-link").symlink_to(tmp_path)
    [(location, name, taken)] = backend.list_checkpoints()
    assert (location, name) == (str(image), "sbx-2001") and taken.tzinfo is not None
    backend.drop_checkpoint(location)
    assert backend.list_checkpoints() == [] and tmp_path.is_dir()


def test_it_names_an_exited_but_unreaped_process_as_ps_does(
    local_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that exited and is not yet reaped has no command line; the list says ``[name]``
    (its kernel name) rather than an empty command."""
    child = subprocess.Popen(["sleep", "0"])
    try:
        deadline = time.monotonic() + 10
        stat = Path(f"/proc/{child.pid}/stat")
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)  # until it has exited (a zombie: Popen has not waited for it)
        monkeypatch.setattr(cgroups, "pids", lambda paths: [child.pid])
        spec = SandboxSpec(
            sandbox_id=1, name="sbx-1", data_dir=Path("/nonexistent"), runtime_dir=Path("/"),
            env={}, memory_mb=0, cpu_millis=0,
        )  # fmt: skip
        [listed] = local_backend.processes(spec, {"cgroups": {"pids": "/nonexistent"}})
        assert (listed.pid, listed.command) == (child.pid, "[sleep]")
    finally:
        child.wait()
