"""A second machine for tests: a network namespace with its own address, made with ``ip netns``
and a veth pair, whose processes reach the root namespace's PostgreSQL and Redis.

``HostNamespace`` (a context manager, root only) makes:

* a network namespace ``hermit-<n>`` with ``lo`` up and one end of a veth pair at
  ``10.213.<n>.2/24`` (``address``); the other end, in the root namespace, is ``10.213.<n>.1``
  (``host_address``). ``n`` is the first number from 1 to 254 whose subnet no interface or
  route of this machine uses and whose namespace name is free (``ip netns add`` fails on a
  taken one, so two test runs never share one);
* a TCP forwarder in this process (asyncio, on a thread of its own) listening on
  ``host_address`` at the ports of PostgreSQL (5432) and Redis (6379), which connects each
  accepted connection to the same port on 127.0.0.1. The services see 127.0.0.1 peers, so their
  own configuration (PostgreSQL's trust for 127.0.0.1) is unchanged. The forwarder accepts only
  the namespace's own address as a peer: nothing but 127.0.0.1 and the namespace ever gets test
  traffic, and nothing routes to 10.213.<n>.0/24 from outside (this machine does not forward).

``share_loopback(port)`` makes ``127.0.0.1:port`` inside the namespace lead to the same port on
this machine's loopback (a relay process inside, ``python -m tests.netns``, to the forwarder):
for services whose 127.0.0.1 URL the namespace reads from the shared database, such as the fake
model server's upstream URL.

``popen(argv)`` runs a command inside the namespace (``ip netns exec``) in a session of its
own and returns its Popen. ``ip netns exec`` mounts the namespace's own sysfs on /sys, which
hides this machine's cgroup hierarchy (/sys/fs/cgroup); ``popen(argv, host_mounts=True)``
enters the network namespace only (``nsenter --net``), keeping this machine's mounts, as a
sandbox host's worker needs (its sandboxes' cgroups are under /sys/fs/cgroup).

Leaving the block (even on an exception) ends every process started there and any other
process still in the namespace, stops the forwarder, deletes the veth pair and the namespace;
:meth:`HostNamespace.leftovers` says what, if anything, is still there. (A sandbox started
there runs in a network namespace of its own, pasta's: the caller stops it, through its
cgroups.)

The pytest fixture ``host_namespace`` (registered in tests/conftest.py) yields one, torn down
after the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import pytest

SUBNETS = ipaddress.ip_network("10.213.0.0/16")
FORWARDED_PORTS = (5432, 6379)  # PostgreSQL, Redis


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _subnet_in_use(n: int) -> bool:
    """Whether any address or route of this machine lies in 10.213.<n>.0/24."""
    subnet = ipaddress.ip_network(f"10.213.{n}.0/24")
    addresses = _ip("-o", "-4", "addr", "show").stdout
    text = addresses + _ip("-4", "route", "show", "table", "all").stdout
    for word in text.split():
        with contextlib.suppress(ValueError):
            if ipaddress.ip_network(word, strict=False).overlaps(subnet):
                return True
    return False


class Forwarder:
    """TCP forwarding from ``listen_host:port`` to ``target_host:port`` for each port, on an
    event loop in a thread of its own; peers other than ``peer`` are refused."""

    def __init__(
        self, listen_host: str, peer: str, ports: Sequence[int], target_host: str = "127.0.0.1"
    ) -> None:
        self.listen_host = listen_host
        self.peer = peer
        self.ports = tuple(ports)
        self.target_host = target_host
        self.connections = 0  # accepted, for tests
        self.refused = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        self._thread.start()
        for port in self.ports:
            self.add(port)

    def add(self, port: int) -> None:
        """Forward one more port."""
        asyncio.run_coroutine_threadsafe(self._listen(port), self._loop).result(timeout=10)

    async def _listen(self, port: int) -> None:
        server = await asyncio.start_server(
            lambda r, w: self._serve(r, w, port), self.listen_host, port
        )
        self._servers.append(server)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int
    ) -> None:
        peer = (writer.get_extra_info("peername") or ("",))[0]
        if peer != self.peer:
            self.refused += 1
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, port)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            for server in self._servers:
                server.close()
            for writer in list(self._writers):
                writer.close()
            for server in self._servers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), 5)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or an error, then close the writing side."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class HostNamespace:
    """A network namespace standing for a second machine (see the module docstring)."""

    def __init__(self, forward: Sequence[int] = FORWARDED_PORTS) -> None:
        self.forward = tuple(forward)
        self.number = 0
        self.name = ""
        self.host_if = ""
        self.ns_if = ""
        self.forwarder: Forwarder | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    # -- addresses --------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The namespace's own address (its side of the veth pair)."""
        return f"10.213.{self.number}.2"

    @property
    def host_address(self) -> str:
        """The root namespace's side of the veth pair, where the forwarder listens."""
        return f"10.213.{self.number}.1"

    def database_url(self, url: str) -> str:
        """``url`` (a postgres:// URL on 127.0.0.1) as seen from inside the namespace."""
        return _rehost(url, self.host_address)

    def redis_url(self, url: str) -> str:
        """``url`` (a redis:// URL on 127.0.0.1) as seen from inside the namespace."""
        return _rehost(url, self.host_address)

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> HostNamespace:
        if os.geteuid() != 0:
            raise PermissionError("a network namespace needs root")
        try:
            self._create()
            self.forwarder = Forwarder(self.host_address, self.address, self.forward)
            self.forwarder.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        for n in range(1 + os.getpid() % 200, 255):
            if _subnet_in_use(n):
                continue
            if _ip("netns", "add", f"hermit-{n}", check=False).returncode != 0:
                continue  # taken by another test run meanwhile
            self.number, self.name = n, f"hermit-{n}"
            break
        else:
            raise RuntimeError("no free 10.213.<n>.0/24 subnet and namespace name")
        self.host_if, self.ns_if = f"hmt{self.number}h", f"hmt{self.number}n"
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_address}/24", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        inside = ("netns", "exec", self.name, "ip")
        _ip(*inside, "addr", "add", f"{self.address}/24", "dev", self.ns_if)
        _ip(*inside, "link", "set", self.ns_if, "up")
        _ip(*inside, "link", "set", "lo", "up")

    def close(self) -> None:
        """End every process in the namespace, stop the forwarder, delete the veth pair and
        the namespace. Safe to call twice and after a failed start."""
        for proc in self.procs:
            _end_group(proc)
        if self.name:
            for pid in self.pids():  # anything that left its session
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for log in self._logs:
            log.close()
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.host_if:
            _ip("link", "del", self.host_if, check=False)  # deletes its peer too
        if self.name:
            _ip("netns", "del", self.name, check=False)

    def route_default(self) -> None:
        """Give the namespace a default route, through the root namespace's side of the veth
        pair, as a machine has one: pasta (each sandbox's network) will not start without a
        routable interface. Nothing goes further: this machine does not forward."""
        _ip("-n", self.name, "route", "replace", "default", "via", self.host_address)

    # -- processes --------------------------------------------------------------------------

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        host_mounts: bool = False,
        **kwargs: Any,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the namespace, in a session of its own; its output goes to
        ``log`` if given (else wherever ``kwargs`` say). It is ended when the block ends.
        With ``host_mounts``, only the network namespace is entered (see the module
        docstring): this machine's /sys, and so its cgroups, stay visible."""
        if log is not None:
            out = log.open("wb")
            self._logs.append(out)
            kwargs.setdefault("stdout", out)
            kwargs.setdefault("stderr", subprocess.STDOUT)
        enter = ["nsenter", f"--net=/run/netns/{self.name}", "--"] if host_mounts else None
        proc = subprocess.Popen(
            [*(enter or ["ip", "netns", "exec", self.name]), *argv],
            env=dict(env) if env is not None else None,
            start_new_session=True,
            **kwargs,
        )
        self.procs.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], timeout: float = 30, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace to its end; return its result (text output)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )

    def share_loopback(self, port: int, timeout: float = 30) -> None:
        """Make ``127.0.0.1:port`` inside the namespace lead to ``127.0.0.1:port`` here, for a
        service whose address the namespace reads from the shared database (a model server's
        URL, say): a relay inside the namespace to the forwarder, which takes the port too."""
        assert self.forwarder is not None
        self.forwarder.add(port)
        relay = [sys.executable, "-m", "tests.netns", str(port), self.host_address]
        proc = self.popen(relay, cwd=Path(__file__).resolve().parents[1])
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"
        deadline = time.monotonic() + timeout
        while self.run([sys.executable, "-c", probe]).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the relay of port {port} in {self.name} did not start")
            time.sleep(0.2)

    def pids(self) -> list[int]:
        """The processes in the namespace now."""
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(pid) for pid in out.split()]

    def leftovers(self) -> list[str]:
        """What is left of the namespace: its name, its interfaces, its processes."""
        found = []
        if self.name in _ip("netns", "list").stdout.split():
            found.append(f"namespace {self.name}")
        for interface in (self.host_if, self.ns_if):
            if interface and _ip("link", "show", interface, check=False).returncode == 0:
                found.append(f"interface {interface}")
        found += [f"process {p.pid}" for p in self.procs if _alive(p.pid)]
        return found


def _rehost(url: str, host: str) -> str:
    """``url`` with its host (127.0.0.1 or localhost) replaced by ``host``."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise ValueError(f"not a URL on 127.0.0.1: {parts.scheme}://{parts.hostname}")
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@{host}" if user else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _end_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process's session; SIGKILL it after ``timeout`` seconds; reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def host_namespace() -> Iterator[HostNamespace]:
    """A second machine: a network namespace with its own address that reaches this one's
    PostgreSQL and Redis at ``host_address`` (see tests.netns)."""
    with HostNamespace() as ns:
        yield ns


def _relay_main(port: int, target: str) -> None:
    """Inside a namespace: forward 127.0.0.1:port to target:port until killed."""
    forwarder = Forwarder("127.0.0.1", "127.0.0.1", [port], target_host=target)
    forwarder.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    forwarder.stop()


if __name__ == "__main__":  # python -m tests.netns PORT TARGET (see share_loopback)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    _relay_main(int(sys.argv[1]), sys.argv[2])
