"""Backups and restores of a real OpenClaw agent in a real sandbox, with real restic.

One pooled sandbox serves every test here that needs a live agent: the chat tests' one
(``alice@chat.test``), so this module starts no gateway of its own; each test leaves it running
(and re-pooled, since a restore restarts it). A cold boot costs ~15 s, so only the tests that
must swap data in under a live agent boot: restore-on-start, a point-in-time restore and a
roll-back. The planted-symlink backup and restore is about what restic and the swap do with
the files: it runs on the in-memory backend (``fake_agent``: running, paused while restic reads,
no gateway). Retention and the lease between two backups are about the repository, not the
agent: they back up a stopped sandbox's data dir written by hand (``data_sandbox``), with the
same real restic. Only the first test's backup sets its repository up with
``restic init`` (~3 s); the others start with a copy of an initialised empty one
(``initialized_repository``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from billing.models import Plan
from sandboxes import actions as sandbox_actions
from sandboxes.backends import cgroups
from sandboxes.backends.fake import FakeBackend
from sandboxes.backups import actions, restic
from sandboxes.models import BackupRepository, Sandbox, SandboxEvent, Snapshot
from tests.fakes.model_server import FakeModelServer
from tests.fixtures.backend import running_fake_sandbox, volume_of
from tests.fixtures.backups import backup_plan, history, sh, tell, write_files
from tests.fixtures.live import ROOT, server_env

pytestmark = pytest.mark.django_db(transaction=True)
EMAIL = "alice@chat.test"  # pooled for other suites too: no gateway start of its own
State = Sandbox.State


@pytest.fixture
def agent(
    sandbox_for: Callable[..., Sandbox], sandbox_pool: Any, model_server: FakeModelServer
) -> Iterator[Sandbox]:
    """The pooled sandbox, running; put back in the pool as the test leaves it (restarted)."""
    sandbox = sandbox_for(EMAIL)
    yield sandbox
    sandbox.refresh_from_db()
    if sandbox.state != State.RUNNING:
        for _ in sandbox_actions.wake_sandbox(sandbox, actor=SandboxEvent.Actor.SYSTEM):
            pass
    sandbox_pool.snapshot(EMAIL)


@pytest.fixture
def fake_agent(fake_backend: FakeBackend) -> Iterator[Sandbox]:
    """A running sandbox on the in-memory backend, its data dir on disk (``exec`` runs there
    as a host process): backups pause it and restores swap its data and start it as a real
    one's, with no gateway to cold boot."""
    sandbox = running_fake_sandbox("symlinks@backups.test")
    yield sandbox
    shutil.rmtree(volume_of(sandbox), ignore_errors=True)


def workspace(sandbox: Sandbox) -> Path:
    return volume_of(sandbox) / "state" / "workspace"


def write(sandbox: Sandbox, name: str, text: str) -> None:
    sh(
        sandbox,
        f"mkdir -p {workspace(sandbox)} && printf %s '{text}' > {workspace(sandbox)}/{name}",
    )


def read(sandbox: Sandbox, name: str) -> str:
    return sh(sandbox, f"cat {workspace(sandbox)}/{name}")


def set_retention(**fields: Any) -> None:
    Plan.objects.filter(slug="free").update(**fields)  # the pool puts the plans back


def leftovers(sandbox: Sandbox) -> list[Path]:
    """Restore, previous and failed dirs of this sandbox beside the data dirs."""
    return list(volume_of(sandbox).parent.glob(f".*-{sandbox.pk}-*"))


def restore_copy(sandbox: Sandbox, snapshot: Snapshot, into: Path) -> Path:
    """Restore ``snapshot`` into a fresh root-owned dir (not the sandbox) and return it."""
    target = into / f"copy-{snapshot.short_id}"
    target.mkdir(mode=0o700)
    with actions.leased(sandbox, "export") as (_lease, repo):
        restic.restore(repo, snapshot.restic_id, target)
    return target


def repository(sandbox: Sandbox) -> restic.Repo:
    return actions.restic_repo(BackupRepository.objects.get(sandbox=sandbox))


def main_pid(sandbox: Sandbox) -> Any:
    sandbox.refresh_from_db()
    return sandbox.backend_state.get("main")


# -- tests -------------------------------------------------------------------------------------


def test_a_fact_told_to_the_agent_survives_losing_its_data_dir(
    agent: Sandbox, model_server: FakeModelServer
) -> None:
    code = secrets.token_hex(4)
    model_server.script(reply=f"Noted: your locker code is {code}.")
    tell(agent, f"Please remember my locker code: {code}")
    write(agent, "locker.txt", code)
    snapshot = actions.backup_sandbox(agent, trigger="user", actor_user=agent.owner)
    assert snapshot is not None and snapshot.trigger == "user"
    assert snapshot.pause_ms is not None  # running: frozen while restic read
    print(f"\nfreeze pause of a running agent's backup: {snapshot.pause_ms} ms")

    sandbox_actions.stop_sandbox(agent)
    shutil.rmtree(volume_of(agent))  # a lost disk
    for _ in sandbox_actions.wake_sandbox(agent):
        pass
    agent.refresh_from_db()
    assert agent.state == State.RUNNING, agent.error_message
    texts = history(agent)
    assert f"Please remember my locker code: {code}" in texts
    assert f"Noted: your locker code is {code}." in texts
    assert read(agent, "locker.txt") == code
    restored = agent.events.filter(kind="restore", message__contains="data is missing")
    assert restored.filter(message__contains=snapshot.short_id).exists()


def test_a_point_in_time_restore_brings_back_an_older_snapshot(
    agent: Sandbox, tmp_path: Path, initialized_repository: Callable[[Sandbox], Any]
) -> None:
    initialized_repository(agent)
    set_retention(backup_keep_last=10)
    write(agent, "version.txt", "one")
    older = actions.backup_sandbox(agent, trigger="user")
    write(agent, "version.txt", "two")
    newer = actions.backup_sandbox(agent, trigger="user")
    assert older is not None and newer is not None
    write(agent, "version.txt", "three")  # not backed up yet: the restore must not lose it

    out, err = StringIO(), StringIO()
    call_command("restore", EMAIL, "--snapshot", older.short_id, stdout=out, stderr=err)
    assert f"restored snapshot {older.short_id}" in out.getvalue()
    assert "100%|" in err.getvalue()
    agent.refresh_from_db()
    assert agent.state == State.RUNNING
    assert read(agent, "version.txt") == "one"
    assert history(agent) is not None  # the agent answers
    assert leftovers(agent) == []
    pre = agent.snapshots.get(trigger=Snapshot.Trigger.PRE_RESTORE)
    copy = restore_copy(agent, pre, tmp_path)
    assert (copy / "state/workspace/version.txt").read_text() == "three"
    steps = agent.events.filter(kind="restore").order_by("created_at", "id")
    assert {e.actor for e in steps} == {SandboxEvent.Actor.STAFF}
    last = steps.last()
    assert last is not None
    assert last.message == f"Restored snapshot {older.short_id}; your agent is running"


def test_a_corrupted_repository_is_detected_and_the_live_agent_untouched(
    agent: Sandbox, initialized_repository: Callable[[Sandbox], Any]
) -> None:
    initialized_repository(agent)
    write(agent, "keep.txt", "live data")
    snapshot = actions.backup_sandbox(agent, trigger="user", force=True)
    assert snapshot is not None
    pid = main_pid(agent)
    repo = repository(agent)
    packs = [p for p in (Path(repo.location) / "data").rglob("*") if p.is_file()]
    for pack in packs:
        raw = bytearray(pack.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        pack.chmod(0o600)
        pack.write_bytes(bytes(raw))
    with pytest.raises(restic.ResticError) as checked:
        restic.check(repo, read_data=True)
    assert checked.value.corrupt
    with pytest.raises(actions.BackupFailed, match=r"damaged.*unchanged"):
        actions.restore_sandbox(agent, snapshot)
    agent.refresh_from_db()
    assert agent.state == State.RUNNING and main_pid(agent) == pid  # never stopped
    assert read(agent, "keep.txt") == "live data"
    assert leftovers(agent) == []
    assert history(agent) is not None


def test_a_worker_killed_mid_backup_leaves_earlier_snapshots_and_the_next_backup_works(
    agent: Sandbox,
    sandbox_dirs: dict[str, str],
    tmp_path: Path,
    initialized_repository: Callable[[Sandbox], Any],
) -> None:
    initialized_repository(agent)
    set_retention(backup_keep_last=10)
    write(agent, "before.txt", "earlier")
    earlier = actions.backup_sandbox(agent, trigger="user", force=True)
    assert earlier is not None
    big = workspace(agent) / "big.bin"
    sh(agent, f"head -c 150000000 /dev/urandom > {big}")  # restic needs a while for this
    # The agent keeps touching it, so the paused (second) pass of a backup reads it all again:
    # long enough to kill the worker while the agent is frozen.
    sh(
        agent,
        f"nohup sh -c 'while :; do touch {big}; sleep 0.2; done' </dev/null >/dev/null 2>&1 &",
    )
    try:
        env = server_env(
            **sandbox_dirs,
            DJANGO_SETTINGS_MODULE=os.environ["DJANGO_SETTINGS_MODULE"],
            HERMIT_BACKUP_LEASE_SECONDS="5",
        )
        log = tmp_path / "worker.log"
        with log.open("wb") as stderr:
            worker = subprocess.Popen(
                [sys.executable, "manage.py", "backup", EMAIL, "--force"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            # Until the agent is frozen, or the worker ended (then at once, saying why).
            wait_for(
                lambda: (
                    cgroups.is_frozen(agent.backend_state["cgroups"]) or worker.poll() is not None
                ),
                120,
                every=0.01,
                why=lambda: f"the agent was not frozen; the worker said: {log.read_text()[-3000:]}",
            )
            # restic is reading the big file again, the agent frozen: kill the worker now
            assert worker.poll() is None, (
                f"the backup finished before it could be killed: {log.read_text()[-3000:]}"
            )
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
        row = BackupRepository.objects.get(sandbox=agent)
        assert row.lock_kind == "backup"  # the dead worker's lease, not released
        assert cgroups.is_frozen(agent.backend_state["cgroups"])  # it died while restic read
        with pytest.raises(actions.BackupBusy):
            actions.backup_sandbox(agent, trigger="user", force=True)
        assert sandbox_actions.reconcile_sandbox(agent) == "ok"  # its lease is still alive
        wait_for(
            lambda: BackupRepository.objects.filter(
                pk=row.pk, locked_until__lt=timezone.now()
            ).exists(),
            10,
        )
        started_at = agent.started_at
        assert sandbox_actions.reconcile_sandbox(agent) == "backup-recovered"  # resumed it
        agent.refresh_from_db()
        assert agent.state == State.RUNNING
        assert agent.started_at == started_at  # resumed, not restarted
        assert not cgroups.is_frozen(agent.backend_state["cgroups"])
        assert history(agent) is not None  # answering again
        sh(agent, "pkill -f 'do touc[h]' || true")

        copy = restore_copy(agent, earlier, tmp_path)
        assert (copy / "state/workspace/before.txt").read_text() == "earlier"
        restic.check(repository(agent), read_data=True)
        after = actions.backup_sandbox(agent, trigger="user", force=True)
        assert after is not None and after.size_bytes > 150_000_000
        assert [s.restic_id for s in agent.snapshots.all()] == [after.restic_id, earlier.restic_id]
        sh(agent, f"rm {big}")
    finally:  # a failure above must not leave the shared agent frozen, touching, or 150 MB bigger
        cleanup_big_file(agent, big)


def cleanup_big_file(agent: Sandbox, big: Path) -> None:
    """Thaw the agent, end the loop that touches ``big`` and remove it (if still there)."""
    agent.refresh_from_db()
    if agent.state == State.RUNNING and agent.backend_state:
        cgroups.thaw(agent.backend_state["cgroups"])
        sh(agent, f"pkill -f 'do touc[h]'; rm -f {big}; true")


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    every: float = 0.1,
    why: Callable[[], str] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s {why()}".strip())
        time.sleep(every)


def test_retention_keeps_exactly_what_the_plan_says(data_sandbox: Callable[..., Sandbox]) -> None:
    sandbox = data_sandbox("retention@backups.test", repository=True)
    plan = backup_plan(sandbox.owner, backup_keep_last=2, backup_keep_daily=0, backup_keep_weekly=0)
    made = []
    for n in range(4):
        write_files(volume_of(sandbox), {"state/workspace/count.txt": str(n)})
        snapshot = actions.backup_sandbox(sandbox, trigger="schedule")
        assert snapshot is not None
        made.append(snapshot.restic_id)
    in_repo = [s.id for s in restic.snapshots(repository(sandbox))]
    assert in_repo == made[-2:]
    assert sorted(sandbox.snapshots.values_list("restic_id", flat=True)) == sorted(made[-2:])
    assert sandbox.events.filter(message="Retention removed 1 old snapshot(s)").count() == 2

    # One a day: these share a day.
    Plan.objects.filter(pk=plan.pk).update(backup_keep_last=0, backup_keep_daily=7)
    write_files(volume_of(sandbox), {"state/workspace/count.txt": "last"})
    last = actions.backup_sandbox(sandbox, trigger="schedule")
    assert last is not None
    assert [s.id for s in restic.snapshots(repository(sandbox))] == [last.restic_id]
    assert list(sandbox.snapshots.values_list("restic_id", flat=True)) == [last.restic_id]


def test_a_restore_whose_agent_never_answers_rolls_back(
    agent: Sandbox, tmp_path: Path, initialized_repository: Callable[[Sandbox], Any]
) -> None:
    initialized_repository(agent)
    write(agent, "keep.txt", "the good data")
    broken = tmp_path / "broken"
    (broken / "home").mkdir(parents=True)
    (broken / "state").write_text("OpenClaw cannot use a file as its state directory\n")
    with actions.leased(agent, "backup") as (_lease, repo):
        made = restic.backup(repo, broken, tags=["trigger=staff"], host=agent.slug)
    bad = next(s for s in actions.sync_snapshots(agent) if s.restic_id == made.snapshot_id)

    with pytest.raises(actions.BackupFailed, match=r"did not start.*back as it was"):
        actions.restore_sandbox(agent, bad, actor=SandboxEvent.Actor.STAFF)
    agent.refresh_from_db()
    assert agent.state == State.RUNNING, agent.error_message
    assert read(agent, "keep.txt") == "the good data"
    assert (volume_of(agent) / "state").is_dir()
    assert leftovers(agent) == []
    assert agent.events.filter(kind="restore", message__startswith="Restore rolled back").exists()
    assert history(agent) is not None


def test_two_backups_at_once_the_second_is_busy(data_sandbox: Callable[..., Sandbox]) -> None:
    agent = data_sandbox("race@backups.test", repository=True)
    write_files(volume_of(agent), {"state/workspace/race.txt": secrets.token_hex(8)})
    first_started, second_done = threading.Event(), threading.Event()
    results: list[Any] = []

    def hold(percent: int, message: str) -> None:
        first_started.set()
        second_done.wait(30)

    def first() -> None:
        try:
            results.append(actions.backup_sandbox(agent, trigger="user", on_progress=hold))
        except Exception as exc:
            results.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert first_started.wait(30)
        with pytest.raises(actions.BackupBusy, match="A backup of this agent is already running"):
            actions.backup_sandbox(agent, trigger="staff", force=True)
        with pytest.raises(actions.BackupBusy):
            actions.restore_sandbox(agent)
    finally:
        second_done.set()
        thread.join(120)
    assert len(results) == 1 and isinstance(results[0], Snapshot), results
    assert agent.snapshots.count() == 1


def test_a_planted_symlink_cannot_make_backup_or_restore_reach_outside(
    fake_agent: Sandbox, tmp_path: Path, initialized_repository: Callable[[Sandbox], Any]
) -> None:
    agent = fake_agent
    initialized_repository(agent)
    secret = tmp_path / "host-secret.txt"
    secret.write_text(f"HOST SECRET {secrets.token_hex(8)}")
    secret.chmod(0o600)
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    ws = workspace(agent)
    sh(
        agent,
        f"mkdir -p {ws} && cd {ws} && ln -sfn {secret} secret-link && ln -sfn {host_dir} dir-link"
        " && ln -sfn ../../../../../../../.. up-link && ln -sfn /etc/shadow shadow-link"
        f" && rm -rf {volume_of(agent)}/cache && ln -sfn / {volume_of(agent)}/cache",
    )
    snapshot = actions.backup_sandbox(agent, trigger="user", force=True)
    assert snapshot is not None
    archive = BytesIO()
    with actions.leased(agent, "export") as (_lease, repo):
        restic.dump_archive(repo, snapshot.restic_id, archive)
    archive.seek(0)
    with tarfile.open(fileobj=archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        link = members["data/state/workspace/secret-link"]
        assert link.issym() and link.linkname == str(secret)
        assert members["data/state/workspace/dir-link"].issym()
        contents = b"".join(
            f.read() for m in tar.getmembers() if m.isfile() and (f := tar.extractfile(m))
        )
    assert secret.read_bytes() not in contents
    assert members["data/state/workspace/shadow-link"].issym()
    assert "data/cache" not in members  # excluded, whatever the sandbox put there

    before = (secret.read_text(), secret.stat().st_mode, secret.stat().st_uid)
    actions.restore_sandbox(agent, snapshot)
    agent.refresh_from_db()
    assert agent.state == State.RUNNING
    # The data it replaced is kept, even if unchanged since the backup just taken.
    pre = agent.snapshots.filter(trigger=Snapshot.Trigger.PRE_RESTORE).first()
    assert pre is not None and pre.taken_at > snapshot.taken_at
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host-dir", "host-secret.txt"]
    assert list(host_dir.iterdir()) == []
    assert (secret.read_text(), secret.stat().st_mode, secret.stat().st_uid) == before
    restored = os.lstat(ws / "secret-link")
    assert stat.S_ISLNK(restored.st_mode) and os.readlink(ws / "secret-link") == str(secret)
    sh(agent, f"cd {ws} && rm -f secret-link dir-link up-link shadow-link")


# -- a restore whose worker died: reconcile finishes it (no agent boots: the runtime is gone,
# so every start fails at once, the worst case for keeping data) ------------------------------

INTERRUPTED = [
    # state, live data, previous data, reconcile's outcome, the data left live
    ("restoring", None, "previous", "rolled-back", "previous"),  # died between the renames
    ("restoring", "restored", "previous", "rolled-back", "previous"),  # restored never ran
    ("restoring", "mine", None, "resumed", "mine"),  # died before the swap
    ("running", "restored", "previous", "restore-finished", "restored"),  # it answered
    ("failed", "restored", "previous", "rolled-back", "previous"),  # it never answered
]


@pytest.mark.parametrize(("state", "live", "previous", "outcome", "left"), INTERRUPTED)
def test_reconcile_finishes_a_restore_whose_worker_died(
    data_sandbox: Callable[..., Sandbox],
    state: str,
    live: str | None,
    previous: str | None,
    outcome: str,
    left: str,
) -> None:
    from sandboxes.models import RuntimeImage

    RuntimeImage.objects.all().delete()
    sandbox = data_sandbox(f"{state}-{live}-{previous}@interrupted.test", state=state)
    parent, pk = volume_of(sandbox).parent, sandbox.pk
    if previous is not None:
        write_which(parent / f".previous-{pk}-0123456789ab", previous)
    (parent / f".restore-{pk}-ba9876543210").mkdir(mode=0o700)
    if live is None:
        shutil.rmtree(volume_of(sandbox))
    else:
        write_which(volume_of(sandbox), live)
    row = actions.repository_for(sandbox)
    dead = {"lock_token": "dead-worker", "lock_kind": "restore"}
    BackupRepository.objects.filter(pk=row.pk).update(
        **dead, locked_until=timezone.now() + timedelta(seconds=30)
    )
    assert actions.reconcile_backups(sandbox) == ("pending" if state == "restoring" else None)
    BackupRepository.objects.filter(pk=row.pk).update(locked_until=timezone.now())

    assert sandbox_actions.reconcile_sandbox(sandbox) == outcome
    assert (volume_of(sandbox) / "which.txt").read_text() == left
    assert leftovers(sandbox) == []
    sandbox.refresh_from_db()
    assert sandbox.state != State.RESTORING
    row.refresh_from_db()
    assert row.lock_token == ""
    assert sandbox_actions.reconcile_sandbox(sandbox) != outcome  # done once


def write_which(root: Path, text: str) -> None:
    root.mkdir(mode=0o700, exist_ok=True)
    (root / "which.txt").write_text(text)


def test_a_start_fails_rather_than_boot_empty_when_the_backups_cannot_be_read(
    data_sandbox: Callable[..., Sandbox],
) -> None:
    sandbox = data_sandbox("unreadable@restore-on-start.test", repository=True)
    assert actions.backup_sandbox(sandbox, trigger="user") is not None
    shutil.rmtree(volume_of(sandbox))  # a new disk
    BackupRepository.objects.filter(sandbox=sandbox).update(password="a key that opens nothing")

    steps = list(sandbox_actions.start_sandbox(sandbox, explicit=True))
    sandbox.refresh_from_db()
    assert sandbox.state == State.FAILED
    assert sandbox.error_message.startswith(
        "This agent's data is missing and could not be restored from its backups: "
        "The backup repository's password does not open it"
    )
    assert "a key that opens nothing" not in sandbox.error_message
    assert steps[-1].message.startswith("Failed: This agent's data is missing")
    assert not volume_of(sandbox).exists()  # no empty agent was made
    assert leftovers(sandbox) == []
