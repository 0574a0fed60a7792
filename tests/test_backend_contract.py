"""The sandbox backend contract (sandboxes/backends/base.py), one suite for every backend.

JupyterHub's MockSpawner pattern: the same tests run against the in-memory fake backend (which
the portal's own tests use) and the local bubblewrap backend, so the fake cannot drift from what
a real backend does. Each backend gets ONE sandbox for the whole module (for the local backend a
real OpenClaw gateway: a start costs ~10 s and ~12 CPU-s), taken through its life in file order:
started, inspected, paused, re-attached to, its read-only files rewritten, checkpointed and
restored, and finally stopped. The data volume methods (``volume``, ``prepare_volume``,
``remove_volume``) are checked on another sandbox id, one that never runs.
What the local backend does in depth (isolation, limits, CRIU details) is in
tests/test_local_backend.py and tests/test_checkpoint.py; this suite is what both must honour.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sandboxes.backends import cgroups, volumes
from sandboxes.backends.base import (
    BackendError,
    CheckpointImage,
    ExecResult,
    ProcessInfo,
    Progress,
    SandboxBackend,
    SandboxSpec,
)
from sandboxes.backends.fake import FakeBackend
from sandboxes.backends.local import LocalBackend
from sandboxes.openclaw.config import CONFIG_PATH, SUBDIRS
from tests.fixtures.runtime import make_gateway_spec

SHELL_ARGV = ["sh", "-c", 'echo "out $1"; echo "err $1" >&2; exit 3', "sh", "contract"]
READ_ONLY = str(Path(CONFIG_PATH).parent / "contract.txt")  # a second spec.files entry
VOLUME_OFFSET = 50_000  # volume tests use sandbox id + this: a sandbox that never ran


@dataclass
class Subject:
    """One backend and its one sandbox, with what the suite needs to look behind the contract."""

    backend: SandboxBackend
    spec: SandboxSpec
    fresh: Callable[[], SandboxBackend]  # a new backend object, configured as this one
    is_frozen: Callable[[dict[str, Any]], bool]  # whether the sandbox's processes are paused
    read_file: Callable[[dict[str, Any], str], str]  # a read-only file, as the sandbox sees it
    progress: list[Progress] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        self.progress = list(self.backend.start(self.spec))
        self.state = last_state(self.progress)

    def ensure_running(self) -> None:
        """Start the sandbox again if an earlier test (or a -k selection) left it down."""
        if not self.state or not self.backend.poll(self.spec, self.state).running:
            self.start()


def last_state(progress: list[Progress]) -> dict[str, Any]:
    assert progress, "a start yields at least one Progress"
    state = progress[-1].state
    assert state, "the last Progress carries the state to persist"
    return state


class _AIStub(BaseHTTPRequestHandler):
    """Where the local sandbox's AI-gateway port leads (no test here makes a model call)."""

    def do_GET(self) -> None:
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def ai_stub_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AIStub)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def fake_subject(tmp: Path, sandbox_id: int) -> Subject:
    data_dir = tmp / f"data-{sandbox_id}"
    data_dir.mkdir()
    spec = SandboxSpec(
        sandbox_id=sandbox_id,
        name=f"sbx-{sandbox_id}",
        data_dir=data_dir,
        runtime_dir=tmp / "runtime",
        env={"HOME": str(data_dir)},
        memory_mb=1536,
        cpu_millis=1000,
        files={READ_ONLY: "before\n"},
    )
    backend = FakeBackend()
    return Subject(
        backend=backend,
        spec=spec,
        fresh=FakeBackend,
        is_frozen=lambda state: backend.is_frozen(spec.name),
        read_file=lambda state, inside: backend.files(spec.name)[inside],
    )


def local_subject(request: pytest.FixtureRequest) -> Subject:
    backend: LocalBackend = request.getfixturevalue("local_backend")
    spec = make_gateway_spec(
        request.getfixturevalue("sandbox_root"),
        request.getfixturevalue("runtime_dir"),
        next(request.getfixturevalue("sandbox_ids")),
        ai_gateway_port=request.getfixturevalue("ai_stub_port"),
    )
    spec = dataclasses.replace(spec, files={**spec.files, READ_ONLY: "before\n"})

    def read_file(state: dict[str, Any], inside: str) -> str:
        result = backend.exec(spec, state, ["cat", inside])
        assert result.exit_code == 0, result.stderr
        return result.stdout

    def fresh() -> LocalBackend:
        return LocalBackend(
            run_root=backend.run_root,
            cgroup_parent=backend.cgroup_parent,
            uid_base=backend.uid_base,
            checkpoint_dir=backend.checkpoint_dir,
        )

    return Subject(
        backend=backend,
        spec=spec,
        fresh=fresh,
        is_frozen=lambda state: cgroups.is_frozen(state["cgroups"]),
        read_file=read_file,
    )


@pytest.fixture(scope="module", params=["fake", "local"])
def subject(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Subject]:
    if request.param == "fake":
        made = fake_subject(tmp_path_factory.mktemp("fake-contract"), 990_000 + id(request) % 9999)
    else:
        made = local_subject(request)
    made.start()
    yield made
    made.backend.stop(made.spec, made.state)


@pytest.fixture
def running(subject: Subject) -> Subject:
    subject.ensure_running()
    return subject


# -- start, poll, endpoint ---------------------------------------------------------------------


def test_it_yields_progress_ending_in_the_state_to_persist(running: Subject) -> None:
    progress = running.progress
    assert all(0 <= p.percent <= 100 and p.message.strip() for p in progress)
    assert progress[-1].percent == 100
    state = last_state(progress)
    assert json.loads(json.dumps(state)) == state, "the state is stored as JSON on the row"
    # Every state a start hands out on the way is one the caller may persist, too.
    assert all(json.loads(json.dumps(p.state)) == p.state for p in progress if p.state)


def test_it_polls_a_started_sandbox_as_running_and_an_unstarted_one_as_not(
    running: Subject,
) -> None:
    assert running.backend.poll(running.spec, running.state).running
    never = running.backend.poll(running.spec, {})
    assert not never.running and never.exit_code in (None, 0)


def test_it_says_where_the_gateway_listens_and_refuses_an_unstarted_sandbox(
    running: Subject,
) -> None:
    host, port = running.backend.endpoint(running.spec, running.state)
    assert isinstance(host, str) and host
    assert isinstance(port, int) and 0 < port < 65536
    with pytest.raises(BackendError, match="never started"):
        running.backend.endpoint(running.spec, {})


# -- exec, processes, logs, stats --------------------------------------------------------------


def test_it_runs_a_command_and_returns_its_exit_code_and_output(running: Subject) -> None:
    result = running.backend.exec(running.spec, running.state, SHELL_ARGV)
    assert result == ExecResult(exit_code=3, stdout="out contract\n", stderr="err contract\n")


def test_it_stops_a_command_that_runs_past_its_timeout(running: Subject) -> None:
    began = time.monotonic()
    result = running.backend.exec(running.spec, running.state, ["sleep", "30"], timeout=0.5)
    assert result.timed_out and result.exit_code != 0
    assert time.monotonic() - began < 10
    assert running.backend.poll(running.spec, running.state).running, "only the command died"


def test_it_lists_the_sandboxs_processes(running: Subject) -> None:
    listed = running.backend.processes(running.spec, running.state)
    assert listed and all(isinstance(p, ProcessInfo) for p in listed)
    assert all(p.pid > 0 and p.command and p.rss_bytes >= 0 for p in listed)
    assert any("gateway" in p.command and p.rss_bytes > 0 for p in listed)


def test_it_returns_the_last_lines_of_the_sandboxs_output(running: Subject) -> None:
    everything = running.backend.logs(running.spec, running.state, lines=10_000)
    assert everything.strip(), "a started gateway has said something"
    tail = running.backend.logs(running.spec, running.state, lines=2)
    assert 0 < len(tail.splitlines()) <= 2
    assert everything.rstrip("\n").endswith(tail.rstrip("\n"))


def test_it_reports_memory_cpu_and_disk_and_skips_the_disk_walk_when_asked(
    running: Subject,
) -> None:
    (running.spec.data_dir / "contract-note.txt").write_text("x" * 10_000)
    first = running.backend.stats(running.spec, running.state)
    assert 0 < first.memory_bytes <= first.memory_limit_bytes
    assert first.memory_limit_bytes == running.spec.memory_mb * 2**20
    assert first.cpu_seconds >= 0 and first.oom_kills == 0
    assert first.disk_bytes >= 10_000
    quick = running.backend.stats(running.spec, running.state, disk=False)
    assert quick.disk_bytes == 0 and quick.memory_bytes > 0
    assert quick.cpu_seconds >= first.cpu_seconds, "CPU time only grows while it runs"


# -- freeze, thaw, frozen ----------------------------------------------------------------------


def test_it_pauses_with_freeze_until_thaw_and_both_are_idempotent(running: Subject) -> None:
    backend, spec, state = running.backend, running.spec, running.state
    try:
        backend.freeze(spec, state)
        backend.freeze(spec, state)
        assert running.is_frozen(state)
        assert backend.poll(spec, state).running, "a paused sandbox still runs (RAM kept)"
    finally:
        backend.thaw(spec, state)
    backend.thaw(spec, state)
    assert not running.is_frozen(state)
    assert backend.exec(spec, state, ["true"]).exit_code == 0


def test_it_pauses_for_a_frozen_block_however_it_ends(running: Subject) -> None:
    backend, spec, state = running.backend, running.spec, running.state
    with backend.frozen(spec, state):
        assert running.is_frozen(state)
    assert not running.is_frozen(state)
    with pytest.raises(RuntimeError, match="inside"), backend.frozen(spec, state):
        raise RuntimeError("the block failed inside")
    assert not running.is_frozen(state)
    ran = []
    with backend.frozen(spec, {}):  # never started: nothing to pause, the block just runs
        ran.append(True)
    assert ran == [True]


def test_a_dozing_sandbox_stays_paused_after_a_frozen_block(running: Subject) -> None:
    backend, spec, state = running.backend, running.spec, running.state
    backend.freeze(spec, state)
    try:
        with backend.frozen(spec, state):
            assert running.is_frozen(state)
        assert running.is_frozen(state)
    finally:
        backend.thaw(spec, state)
    assert not running.is_frozen(state)


# -- re-attach ---------------------------------------------------------------------------------


def test_a_fresh_backend_reattaches_to_the_sandbox_from_the_persisted_state(
    running: Subject,
) -> None:
    stored = json.loads(json.dumps(running.state))  # as Sandbox.backend_state holds it
    other = running.fresh()
    assert other is not running.backend
    assert other.poll(running.spec, stored).running
    assert other.endpoint(running.spec, stored) == running.backend.endpoint(
        running.spec, running.state
    )
    assert other.exec(running.spec, stored, ["sh", "-c", "echo again"]).stdout == "again\n"
    assert other.stats(running.spec, stored, disk=False).memory_bytes > 0


# -- the read-only files and the data volume -----------------------------------------------------


def test_it_rewrites_a_running_sandboxs_read_only_files_in_place(running: Subject) -> None:
    backend, spec, state = running.backend, running.spec, running.state
    assert running.read_file(state, READ_ONLY) == "before\n"
    backend.write_files(spec, state, {READ_ONLY: "after, and longer than before\n"})
    assert running.read_file(state, READ_ONLY) == "after, and longer than before\n"
    running.fresh().write_files(spec, json.loads(json.dumps(state)), {READ_ONLY: "short\n"})
    assert running.read_file(state, READ_ONLY) == "short\n", "truncated, re-attached"
    with pytest.raises(BackendError, match="not one of"):
        backend.write_files(spec, state, {"/etc/openclaw/other.json": "{}"})
    assert backend.poll(spec, state).running, "a refused rewrite leaves the sandbox alone"
    backend.write_files(spec, state, {READ_ONLY: "before\n"})


def test_it_places_each_volume_without_making_it(running: Subject) -> None:
    backend, sandbox_id = running.backend, running.spec.sandbox_id + VOLUME_OFFSET
    volume = backend.volume(sandbox_id)
    assert isinstance(volume, Path) and volume.is_absolute()
    assert volume == backend.volume(sandbox_id) == running.fresh().volume(sandbox_id)
    assert backend.volume(sandbox_id + 1) != volume
    assert not os.path.lexists(volume), "placing a volume makes nothing"


def test_it_makes_a_volume_with_its_directories_and_keeps_what_is_in_it(
    running: Subject, tmp_path: Path
) -> None:
    backend, sandbox_id = running.backend, running.spec.sandbox_id + VOLUME_OFFSET
    outside = tmp_path / "outside"
    outside.mkdir()
    try:
        volume = backend.prepare_volume(sandbox_id, SUBDIRS)
        assert volume == backend.volume(sandbox_id)
        assert all((volume / sub).is_dir() and not (volume / sub).is_symlink() for sub in SUBDIRS)
        (volume / "state" / "notes.md").write_text("mine")
        os.rename(volume / "cache", volume / "cache.real")
        os.symlink(outside, volume / "cache")  # the sandbox swapped a directory for a link
        assert backend.prepare_volume(sandbox_id, SUBDIRS) == volume  # again: idempotent
        assert (volume / "state" / "notes.md").read_text() == "mine"
        assert (volume / "cache").is_dir() and not (volume / "cache").is_symlink()
        assert list(outside.iterdir()) == [], "the link was not followed"
        assert backend.prepare_volume(sandbox_id) == volume  # no directories asked: still there
        assert (volume / "state" / "notes.md").read_text() == "mine"
    finally:
        backend.remove_volume(sandbox_id)


def test_it_removes_a_volume_following_no_link_and_idempotently(
    running: Subject, tmp_path: Path
) -> None:
    backend, sandbox_id = running.backend, running.spec.sandbox_id + VOLUME_OFFSET
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("the host's")
    volume = backend.prepare_volume(sandbox_id, SUBDIRS)
    (volume / "state" / "deep" / "er").mkdir(parents=True)
    (volume / "state" / "deep" / "er" / "file").write_text("x")
    os.symlink(outside, volume / "link")
    os.symlink(outside / "keep.txt", volume / "state" / "file-link")
    backend.remove_volume(sandbox_id)
    assert not os.path.lexists(volume)
    assert (outside / "keep.txt").read_text() == "the host's"
    backend.remove_volume(sandbox_id)  # idempotent: a missing volume is no error
    running.fresh().remove_volume(sandbox_id)
    assert not os.path.lexists(volume)
    assert running.backend.poll(running.spec, running.state).running, "another sandbox's volume"


# -- checkpoint and restore --------------------------------------------------------------------


def test_it_checkpoints_and_restores_only_onto_the_same_data(running: Subject) -> None:
    backend, spec = running.backend, running.spec
    assert backend.checkpoint_support() == "", "both backends here checkpoint on this machine"
    before = backend.endpoint(spec, running.state)
    image = backend.checkpoint(spec, running.state)
    try:
        assert isinstance(image, CheckpointImage) and image.size_bytes > 0
        assert image.identity == backend.data_identity(spec)
        assert not backend.poll(spec, running.state).running, "a checkpoint stops the sandbox"
        assert backend.processes(spec, running.state) == []
        held = {loc: (name, when) for loc, name, when in backend.list_checkpoints()}
        assert held[image.location][0] == spec.name
        assert isinstance(held[image.location][1], datetime) and held[image.location][1].tzinfo

        foreign = CheckpointImage(image.location, image.size_bytes, "another-data-dir")
        with pytest.raises(BackendError, match="other"):
            list(backend.restore(spec, foreign))
        assert not backend.poll(spec, running.state).running, "the refusal started nothing"

        progress = list(backend.restore(spec, image))
        assert all(0 <= p.percent <= 100 for p in progress) and progress[-1].percent == 100
        running.state = last_state(progress)
        assert backend.poll(spec, running.state).running
        assert backend.endpoint(spec, running.state) == before
        assert backend.exec(spec, running.state, ["sh", "-c", "echo back"]).stdout == "back\n"
    finally:
        backend.drop_checkpoint(image.location)
    backend.drop_checkpoint(image.location)  # idempotent
    assert image.location not in [loc for loc, _, _ in backend.list_checkpoints()]
    with pytest.raises(BackendError, match="missing"):
        list(backend.restore(spec, image))
    assert backend.poll(spec, running.state).running, "the refusal left the sandbox alone"


def test_a_backend_that_cannot_checkpoint_refuses_with_the_reason_it_gives(
    tmp_path: Path,
) -> None:
    """The refusal documented on SandboxBackend, for the local backend on a host without CRIU
    (the fake always can; the base class's default is what a backend without CRIU inherits)."""
    backend = LocalBackend(
        run_root=tmp_path / "run", criu_path=str(tmp_path / "no-criu"), checkpoint_dir=tmp_path
    )
    reason = backend.checkpoint_support()
    assert "CRIU was not found" in reason
    spec = SandboxSpec(1, "sbx-1", tmp_path, tmp_path, {}, 256, 500)
    with pytest.raises(BackendError) as refused:
        backend.checkpoint(spec, {"init": [1, 1]})
    assert str(refused.value) == reason
    image = CheckpointImage(str(tmp_path / "sbx-1-x"), 1, backend.data_identity(spec))
    with pytest.raises(BackendError) as refused:
        list(backend.restore(spec, image))
    assert str(refused.value) == reason


# -- stop (last: it ends the module's sandbox) --------------------------------------------------


def test_it_stops_idempotently_and_then_polls_the_sandbox_as_stopped(running: Subject) -> None:
    backend, spec, state = running.backend, running.spec, running.state
    backend.stop(spec, state, timeout=2)
    assert not backend.poll(spec, state).running
    assert not running.fresh().poll(spec, json.loads(json.dumps(state))).running
    backend.stop(spec, state, timeout=2)
    assert not backend.poll(spec, state).running
    assert backend.processes(spec, state) == []
    with pytest.raises(BackendError, match="not running"):
        backend.exec(spec, state, ["true"])
    backend.thaw(spec, state)  # a no-op on a stopped sandbox
    with backend.frozen(spec, state):  # nothing to pause: the block just runs
        pass


def test_it_refuses_to_rewrite_the_files_of_a_sandbox_that_is_not_running(
    subject: Subject,
) -> None:
    """Runs after the stop above (or on a sandbox that never started, alone with -k)."""
    for state in (subject.state, {}):
        with pytest.raises(BackendError, match="not running"):
            subject.backend.write_files(subject.spec, state, {READ_ONLY: "late\n"})


# -- what the machine holds (last: it starts the sandbox again, then evicts it) ---------------


def test_it_lists_what_it_holds_and_evicts_a_sandbox_by_its_id_alone(running: Subject) -> None:
    """What a lost host that came back fences with (sandboxes.fencing): no state needed."""
    backend, spec, state = running.backend, running.spec, running.state
    other = spec.sandbox_id + VOLUME_OFFSET
    assert spec.sandbox_id in backend.resident()
    assert other not in backend.resident()
    backend.prepare_volume(other)
    try:
        assert {spec.sandbox_id, other} <= running.fresh().resident()
        # A data dir shared by several hosts: the volume another host prepared since is not
        # this one's to hold (or to fence).
        volumes.claim(backend.volume(other), "another-host")
        assert other not in backend.resident()
        backend.prepare_volume(other)  # prepared here again: this host's once more
        assert other in backend.resident()
    finally:
        backend.remove_volume(other)
    assert other not in backend.resident()
    assert volumes.owner(backend.volume(other)) is None, "its owner record went with it"

    running.fresh().evict(spec.sandbox_id)  # a fresh backend object, and no state given
    assert not backend.poll(spec, state).running
    assert backend.processes(spec, state) == []
    has_volume = os.path.lexists(backend.volume(spec.sandbox_id))
    assert (spec.sandbox_id in backend.resident()) == has_volume, "only its volume is left"
    backend.evict(spec.sandbox_id)  # idempotent
    backend.evict(other)  # one that never ran: nothing to do
