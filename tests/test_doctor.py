"""manage.py doctor: all OK on this (healthy) test machine, and a named problem with the command
that fixes it when bubblewrap is missing, storage is unwritable or the bucket is missing."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from sandboxes import doctor, runtime
from tests.fixtures.s3 import S3Server
from tests.net import free_port

pytestmark = pytest.mark.django_db


@pytest.fixture
def healthy(runtime_dir: Path, settings: Any) -> None:
    """This machine as a deploy has it: the local backend, the runtime built and current."""
    settings.SANDBOX_BACKEND = "local"
    runtime.build()


def _doctor(*args: str) -> tuple[str, str | None]:
    """Run the command; return its output and the CommandError's message (None if it passed)."""
    out = io.StringIO()
    try:
        call_command("doctor", *args, stdout=out, no_color=True)
    except CommandError as exc:
        return out.getvalue(), str(exc)
    return out.getvalue(), None


def _failed(output: str) -> dict[str, str]:
    """Return {check name: its detail and fix lines} of the failed checks in the output."""
    failed: dict[str, str] = {}
    name = ""
    for line in output.splitlines():
        if line.startswith("FAIL"):
            name = line[4:].strip().split("  ")[0]
            failed[name] = line
        elif line.startswith(" ") and name:
            failed[name] += "\n" + line
        else:
            name = ""
    return failed


def test_it_passes_every_check_on_a_healthy_machine(healthy: None) -> None:
    output, error = _doctor()

    assert error is None, output
    names = [line[4:].strip().split("  ")[0] for line in output.splitlines()[:-1]]
    assert names == [
        "bubblewrap", "pasta", "cgroups", "seccomp", "database", "runtime image", "data dir",
        "backup storage", "broker", "disk", "memory",
    ]  # fmt: skip
    assert all(line.startswith("OK") for line in output.splitlines()[:-1]), output
    assert "runs a sandbox" in output
    assert "loads and denies" in output
    assert output.splitlines()[-1] == "All 11 checks passed."


def test_it_names_a_missing_bubblewrap_and_how_to_install_it(
    healthy: None, settings: Any, tmp_path: Path
) -> None:
    settings.HERMIT_BWRAP = str(tmp_path / "bin" / "bwrap")

    output, error = _doctor()

    assert error == "1 of 11 checks failed: bubblewrap"
    problem = _failed(output)["bubblewrap"]
    assert f"bwrap not found at '{tmp_path}/bin/bwrap' (HERMIT_BWRAP)" in problem
    assert "fix: apt-get install bubblewrap" in problem


def test_it_names_a_data_dir_and_backup_dir_that_cannot_be_written(
    healthy: None, settings: Any, tmp_path: Path
) -> None:
    settings.HERMIT_DATA_DIR = tmp_path / "missing"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    settings.HERMIT_BACKUP_DIR = str(blocker / "backups")

    output, error = _doctor()

    assert error == "2 of 11 checks failed: data dir, backup storage"
    failed = _failed(output)
    assert f"{tmp_path}/missing does not exist (HERMIT_DATA_DIR)" in failed["data dir"]
    assert f"fix: mkdir -p {tmp_path}/missing" in failed["data dir"]
    assert f"{blocker}/backups does not exist (HERMIT_BACKUP_DIR)" in failed["backup storage"]


def test_it_names_a_missing_runtime_image_and_the_build_command(
    healthy: None, settings: Any
) -> None:
    runtime.RuntimeImage.objects.update(is_current=False)

    output, error = _doctor()

    assert error == "1 of 11 checks failed: runtime image"
    problem = _failed(output)["runtime image"]
    assert "The OpenClaw runtime is not built yet" in problem
    assert f"fix: {doctor.manage('build_runtime')}" in problem
    assert problem.endswith("manage.py build_runtime")


def test_it_fails_below_the_free_disk_and_ram_thresholds(healthy: None) -> None:
    output, error = _doctor("--min-free-disk-mb", str(10**9), "--min-available-ram-mb", str(10**9))

    assert error == "2 of 11 checks failed: disk, memory"
    failed = _failed(output)
    assert "below 1000000000 MB" in failed["disk"] and "fix: du -xh" in failed["disk"]
    assert "sandbox sleep --all" in failed["memory"]


def test_it_checks_that_the_backup_bucket_is_reachable(
    healthy: None, s3_backups: S3Server, settings: Any
) -> None:
    output, error = _doctor()
    assert error == "1 of 11 checks failed: backup storage"
    assert f"bucket {s3_backups.bucket} does not exist at" in _failed(output)["backup storage"]
    assert "ensure_bucket()" in _failed(output)["backup storage"]

    s3_backups.client().create_bucket(Bucket=s3_backups.bucket)
    output, error = _doctor()
    assert error is None, output
    assert f"OK    backup storage  bucket {s3_backups.bucket} at {s3_backups.endpoint}" in output


def test_it_reports_a_check_that_blows_up_and_goes_on(
    healthy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> doctor.Result:
        raise RuntimeError("odd host")

    monkeypatch.setattr(doctor, "check_pasta", broken)

    results = doctor.run_checks()

    assert [r.name for r in results if not r.ok] == ["pasta"]
    assert results[1].detail == "the check failed: RuntimeError: odd host"


def test_it_names_an_unreachable_broker(healthy: None, settings: Any) -> None:
    settings.CELERY_BROKER_URL = f"redis://:s3cret-pass@127.0.0.1:{free_port()}/0"

    output, error = _doctor()

    assert error == "1 of 11 checks failed: broker"
    problem = _failed(output)["broker"]
    assert "cannot reach the broker redis://:[REDACTED]@127.0.0.1" in problem
    assert "s3cret-pass" not in output
    assert "fix: systemctl start redis-server" in problem
