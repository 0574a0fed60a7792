"""The second-machine test harness (tests.netns): a network namespace with its own address that
reaches the root namespace's PostgreSQL and Redis through the forwarder, runs a real Celery
worker of the portal, and leaves nothing behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from portal.celery import app
from sandboxes.hosts import queue_for
from sandboxes.models import SandboxHost
from tests.fakes.gateway_double import GatewayDouble
from tests.fixtures.live import ROOT, server_env
from tests.fixtures.live import test_database_url as served_database_url
from tests.netns import HostNamespace, _alive

PROBE_STATE = SandboxHost.State.LOST  # so placement never picks the probe's row


@app.task(name="tests.test_netns.probe")
def probe(name: str, peer: str) -> None:
    """Record, as a host row named ``name``, the address this process reaches ``peer`` from."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((peer, 9))  # no packet is sent: this only picks the route
        address = sock.getsockname()[0]
    SandboxHost.objects.create(name=name, address=address, state=PROBE_STATE)


def _redis_url() -> str:
    url = os.environ.get("REDIS_URL", "")
    assert url, "these tests need REDIS_URL (redis://127.0.0.1:6379/0): see the README"
    return url


def _wait(check: Callable[[], Any], timeout: float, what: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, what()
        time.sleep(0.2)
    return result


def test_it_reaches_postgresql_and_redis_from_inside(
    db: None, host_namespace: HostNamespace
) -> None:
    ns = host_namespace
    assert connection.vendor == "postgresql", "these tests need DATABASE_URL on PostgreSQL"
    database = connection.settings_dict["NAME"]
    psql = ns.run(
        ["psql", "-h", ns.host_address, "-U", "postgres", "-d", database, "-tAc",
         "SELECT current_database(), inet_client_addr()"]
    )  # fmt: skip
    assert psql.returncode == 0, psql.stderr
    assert psql.stdout.strip() == f"{database}|127.0.0.1", psql  # the forwarder's peer

    client = (
        "import sys, psycopg, redis\n"
        "with psycopg.connect(sys.argv[1]) as conn:\n"
        "    print(conn.execute('SELECT 41 + 1').fetchone()[0])\n"
        "r = redis.Redis.from_url(sys.argv[2])\n"
        "r.set(sys.argv[3], 'from inside', ex=60)\n"
        "print(r.ping())\n"
    )
    key = f"hermit-test-netns-{os.getpid()}"
    dsn = ns.database_url(f"postgresql://postgres@127.0.0.1:5432/{database}")
    result = ns.run([sys.executable, "-c", client, dsn, ns.redis_url(_redis_url()), key])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["42", "True"], result
    import redis

    here = redis.Redis.from_url(_redis_url())
    assert here.get(key) == b"from inside"
    here.delete(key)
    assert ns.forwarder is not None
    assert ns.forwarder.connections >= 3, (ns.forwarder.connections, ns.forwarder.refused)

    # The namespace's own loopback is its own: the root namespace's services are not on it.
    connect = "import socket; socket.create_connection(('127.0.0.1', 5432), 2)"
    direct = ns.run([sys.executable, "-c", connect])
    assert direct.returncode != 0 and "ConnectionRefusedError" in direct.stderr, direct


def test_it_runs_a_celery_worker_inside_that_takes_a_task_sent_from_here(
    transactional_db: None,
    host_namespace: HostNamespace,
    celery_queue: str,
    sandbox_dirs: dict[str, str],
    tmp_path: Path,
) -> None:
    ns = host_namespace
    host = f"netns-{os.getpid()}"
    env = server_env(
        **sandbox_dirs,
        DATABASE_URL=ns.database_url(served_database_url()),
        REDIS_URL=ns.redis_url(_redis_url()),
        HERMIT_CELERY_QUEUE=celery_queue,
        HERMIT_HOST_NAME=host,
        HERMIT_HOST_ADDRESS=ns.address,
    )
    queue = queue_for(host)
    log = tmp_path / "worker.log"
    worker = ns.popen(
        [sys.executable, "-m", "celery", "-A", "portal", "worker", "-l", "info",
         "--concurrency", "1", "-Q", queue, "-I", "tests.test_netns", "-n", f"{host}@%h"],
        env=env, log=log, cwd=ROOT,
    )  # fmt: skip

    def output() -> str:
        return f"worker exited with {worker.poll()}:\n{log.read_text(errors='replace')[-3000:]}"

    probe.apply_async(args=[f"probe-{host}", ns.host_address], queue=queue)
    row = _wait(lambda: SandboxHost.objects.filter(name=f"probe-{host}").first(), 90, output)
    assert row.address == ns.address  # it ran inside the namespace
    assert "tests.test_netns.probe[" in log.read_text()

    # The worker is a sandbox host's: it registered and heartbeats its host from inside.
    registered = SandboxHost.objects.get(name=host)
    assert registered.address == ns.address
    assert registered.last_heartbeat is not None
    assert ns.forwarder is not None and ns.forwarder.refused == 0


def test_it_shares_a_port_of_this_machines_loopback(host_namespace: HostNamespace) -> None:
    ns = host_namespace
    with GatewayDouble() as server:  # any HTTP server on this machine's 127.0.0.1
        ns.share_loopback(server.port)
        url = f"http://127.0.0.1:{server.port}/x"
        fetch = f"import urllib.request as u; print(u.urlopen({url!r}).status)"
        result = ns.run([sys.executable, "-c", fetch])
        assert result.returncode == 0 and result.stdout.strip() == "200", result
        assert server.last["path"] == "/x"


def test_it_leaves_nothing_behind_even_after_a_failure() -> None:
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="the test failed"), HostNamespace() as ns:
        ns.popen(["sleep", "300"])
        ns.popen(["setsid", "-f", "sleep", "301"])  # a process that left its session
        _wait(lambda: len(ns.pids()) >= 2, 10, lambda: f"pids: {ns.pids()}")
        pids = ns.pids()
        assert os.path.exists(f"/var/run/netns/{ns.name}")
        raise RuntimeError("the test failed")
    assert ns.leftovers() == []
    assert len(pids) >= 2
    assert not [pid for pid in pids if _alive(pid)]
    assert ns.host_address not in _command(["ip", "-o", "addr"])
    assert ns.host_address not in _command(["ss", "-Hltn"])  # the forwarder listens no more


def _command(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout
