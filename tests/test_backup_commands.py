"""The ops CLI for backups: ``manage.py backup USER|--all``, ``snapshots USER`` and
``restore USER [--snapshot ID]``, as ops type them: progress bars on stderr, one line per
result on stdout, a clear message and a non-zero exit on failure. Real restic, on sandboxes
whose data dir is written by hand (the restores that boot an agent are in test_backups.py).
Only the first test's backup sets its repository up with ``restic init`` (~3 s); the others
start with a copy of an initialised empty one."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from sandboxes.backends import safefs
from sandboxes.backups import actions
from sandboxes.models import BackupRepository, Sandbox, SandboxEvent, Snapshot
from tests.fixtures.backend import volume_of
from tests.fixtures.backups import backup_plan, write_files
from tests.fixtures.live import ROOT, server_env

pytestmark = pytest.mark.django_db(transaction=True)
MakeSandbox = Callable[..., Sandbox]


def run(*argv: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*argv, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_backup_backs_up_one_user_with_a_progress_bar(data_sandbox: MakeSandbox) -> None:
    sandbox = data_sandbox("ops1@backups.test")
    backup_plan(sandbox.owner, backup_keep_last=10)  # restic dates them all today: keep them
    out, err = run("backup", "ops1@backups.test")
    snapshot = sandbox.snapshots.get()
    assert out == f"{sandbox}: {snapshot_line(snapshot)}\n"
    assert f"backup {sandbox}: 100%|" in err and "Backed up snapshot" in err
    assert snapshot.trigger == Snapshot.Trigger.OPS and snapshot.files >= 2
    event = sandbox.events.filter(kind="backup").first()
    assert event is not None and event.actor == SandboxEvent.Actor.STAFF
    out, _ = run("backup", "ops1")  # by username too; unchanged, so skipped
    assert out == f"{sandbox}: unchanged since its last snapshot, skipped\n"
    out, _ = run("backup", "ops1@backups.test", "--force")
    assert "snapshot" in out and sandbox.snapshots.count() == 2


def snapshot_line(snapshot: Snapshot) -> str:
    from sandboxes.management.commands.backup import describe

    return describe(snapshot)


def test_backup_all_backs_up_every_sandbox_with_data(data_sandbox: MakeSandbox) -> None:
    first = data_sandbox("all1@backups.test", repository=True)
    second = data_sandbox("all2@backups.test", state="sleeping", repository=True)
    from tests.factories import make_user

    make_user("nodata@backups.test")  # provisioning, no data dir: nothing to back up
    out, _ = run("backup", "--all")
    assert out.count("snapshot") == 2
    assert first.snapshots.count() == second.snapshots.count() == 1


def test_backup_refuses_bad_arguments(data_sandbox: MakeSandbox) -> None:
    data_sandbox("args@backups.test")
    with pytest.raises(CommandError, match=r"USER .* or --all"):
        run("backup")
    with pytest.raises(CommandError, match=r"USER .* or --all"):
        run("backup", "args@backups.test", "--all")
    with pytest.raises(CommandError, match=r"No user 'nobody@backups.test'"):
        run("backup", "nobody@backups.test")
    with pytest.raises(CommandError, match="has no sandbox called 'other'"):
        run("backup", "args@backups.test", "--name", "other")


def test_backup_fails_with_the_reason_when_busy_or_unreadable(data_sandbox: MakeSandbox) -> None:
    sandbox = data_sandbox("fail@backups.test", repository=True)
    run("backup", "fail@backups.test")
    lease = actions.claim_lease(actions.repository_for(sandbox), "restore")
    try:
        with pytest.raises(
            CommandError, match=r"(?s)1 of 1 backups failed:.*A restore of this agent"
        ):
            run("backup", "fail@backups.test", "--force")
    finally:
        actions.release_lease(lease)
    BackupRepository.objects.filter(sandbox=sandbox).update(password="not the password")
    with pytest.raises(CommandError, match="password does not open it") as raised:
        run("backup", "fail@backups.test", "--force")
    assert "not the password" not in str(raised.value)
    assert sandbox.events.filter(message__startswith="Backup failed").exists()


def test_snapshots_lists_them_newest_first(
    data_sandbox: MakeSandbox, initialized_repository: Callable[[Sandbox], Any]
) -> None:
    sandbox = data_sandbox("list@backups.test")
    backup_plan(sandbox.owner, backup_keep_last=10)
    out, _ = run("snapshots", "list@backups.test")
    assert out == f"{sandbox} has no backups yet.\n"
    initialized_repository(sandbox)
    first = actions.backup_sandbox(sandbox, trigger="user")
    write_files(volume_of(sandbox), {"state/workspace/todo.md": "buy milk\n"})
    second = actions.backup_sandbox(sandbox, trigger="staff")
    assert first is not None and second is not None
    Snapshot.objects.filter(pk=first.pk).delete()  # a row lost: the repository is the truth
    out, _ = run("snapshots", "list@backups.test")
    lines = out.splitlines()
    header = "ID TAKEN (UTC) TRIGGER FILES SIZE MB NEW MB PAUSE MS"
    assert lines[0].split() == header.split()
    assert [line.split()[0] for line in lines[1:]] == [second.short_id, first.short_id]
    assert lines[1].split()[3] == "staff" and lines[2].split()[3] == "user"


def test_restore_refuses_an_unknown_or_ambiguous_snapshot_id(
    data_sandbox: MakeSandbox, initialized_repository: Callable[[Sandbox], Any]
) -> None:
    sandbox = data_sandbox("pick@backups.test")
    with pytest.raises(CommandError, match="has no snapshots to restore"):
        run("restore", "pick@backups.test")
    initialized_repository(sandbox)
    snapshot = actions.backup_sandbox(sandbox, trigger="user")
    assert snapshot is not None
    with pytest.raises(CommandError, match="at least 8 characters"):
        run("restore", "pick@backups.test", "--snapshot", snapshot.short_id[:4])
    with pytest.raises(CommandError, match="has no snapshot 00000000"):
        run("restore", "pick@backups.test", "--snapshot", "00000000")


def test_restore_of_a_damaged_repository_fails_and_leaves_the_data_alone(
    data_sandbox: MakeSandbox,
) -> None:
    sandbox = data_sandbox("damaged@backups.test", repository=True)
    snapshot = actions.backup_sandbox(sandbox, trigger="user")
    assert snapshot is not None
    before = safefs.fingerprint(volume_of(sandbox), ())
    damage_packs(Path(BackupRepository.objects.get(sandbox=sandbox).location))
    with pytest.raises(
        CommandError, match=r"Restore of .* failed: The backup repository is damaged"
    ):
        run("restore", "damaged@backups.test", "--snapshot", snapshot.restic_id)
    assert safefs.fingerprint(volume_of(sandbox), ()) == before
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.STOPPED
    assert not list(volume_of(sandbox).parent.glob(f".*-{sandbox.pk}-*"))  # no leftovers
    assert sandbox.events.filter(kind="restore", message__contains="unchanged").exists()


def damage_packs(repo: Path) -> None:
    """Flip bytes in the middle of every data pack of a local repository."""
    packs = [p for p in (repo / "data").rglob("*") if p.is_file()]
    assert packs
    for pack in packs:
        pack.chmod(0o600)
        raw = bytearray(pack.read_bytes())
        for i in range(len(raw) // 3, len(raw) // 3 + 64):
            raw[i] ^= 0xFF
        pack.write_bytes(bytes(raw))


def test_manage_py_exits_non_zero_with_the_reason(
    data_sandbox: MakeSandbox, sandbox_dirs: dict[str, str]
) -> None:
    data_sandbox("exit@backups.test", repository=True)
    env = server_env(**sandbox_dirs, DJANGO_SETTINGS_MODULE=os.environ["DJANGO_SETTINGS_MODULE"])
    ok = subprocess.run(
        [sys.executable, "manage.py", "backup", "exit@backups.test"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "100%|" in ok.stderr
    failed = subprocess.run(
        [sys.executable, "manage.py", "restore", "exit@backups.test", "--snapshot", "deadbeef"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1
    assert "has no snapshot deadbeef" in failed.stderr
