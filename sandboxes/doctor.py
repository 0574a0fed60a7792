"""Health checks of this host and its services, for ``manage.py doctor``.

Contract: ``run_checks()`` runs every check and returns one ``Result`` per check, in order; it
never raises (a check that blows up is a failed check naming the exception). A failed result
says what is wrong (``detail``) and the exact command that fixes it (``fix``). Checks only
read, or write and remove a probe (a file, a cgroup, a sandbox that runs ``true``): they
change nothing an operator made. The sandbox tools (bubblewrap, pasta, cgroups, the seccomp
filter) are checked only when the local backend is configured.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError

from portal.lib.redact import redact

MIN_FREE_DISK_MB = 5 * 1024
MIN_AVAILABLE_RAM_MB = 1024
TOOL_TIMEOUT = 15.0  # seconds for a probe process


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Thresholds:
    min_free_disk_mb: int = MIN_FREE_DISK_MB
    min_available_ram_mb: int = MIN_AVAILABLE_RAM_MB


def run_checks(thresholds: Thresholds | None = None) -> list[Result]:
    """Run every check (see the module doc); return their results in order."""
    limits = thresholds or Thresholds()
    checks: list[tuple[str, Callable[[], Result]]] = []
    if settings.SANDBOX_BACKEND == "local":
        checks += [
            ("bubblewrap", check_bubblewrap),
            ("pasta", check_pasta),
            ("cgroups", check_cgroups),
            ("seccomp", check_seccomp),
        ]
    checks += [
        ("database", check_database),
        ("runtime image", check_runtime),
        ("data dir", check_data_dir),
        ("backup storage", check_backup_storage),
        ("broker", check_broker),
        ("disk", lambda: check_disk(limits.min_free_disk_mb)),
        ("memory", lambda: check_memory(limits.min_available_ram_mb)),
    ]
    results = []
    for name, check in checks:
        try:
            results.append(check())
        except Exception as exc:  # a check's own bug or an odd host: report, go on
            results.append(Result(name, False, f"the check failed: {type(exc).__name__}: {exc}"))
    return results


def manage(command: str) -> str:
    """Return the exact shell command that runs ``manage.py <command>`` on this checkout."""
    return f"{sys.executable} {Path(settings.BASE_DIR) / 'manage.py'} {command}"


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)


def _executable(program: str) -> str | None:
    """Return the absolute path of ``program`` (a path or a name on PATH) if it can be run."""
    found = shutil.which(program)
    return str(Path(found).absolute()) if found else None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def check_bubblewrap() -> Result:
    configured = settings.HERMIT_BWRAP
    path = _executable(configured)
    if path is None:
        return Result(
            "bubblewrap",
            False,
            f"bwrap not found at {configured!r} (HERMIT_BWRAP)",
            "apt-get install bubblewrap  (or set HERMIT_BWRAP to the bwrap binary's path)",
        )
    version = _run([path, "--version"]).stdout.strip()
    probe = _run(
        [path, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all",
         "--die-with-parent", "--new-session", "true"]
    )  # fmt: skip
    if probe.returncode != 0:
        return Result(
            "bubblewrap",
            False,
            f"{path} cannot start a sandbox: {_last_line(probe.stderr)}",
            "run Hermit's worker as root on a kernel with namespaces "
            f"(try: {path} --ro-bind / / --unshare-all true)",
        )
    return Result("bubblewrap", True, f"{path} ({version or 'unknown version'}) runs a sandbox")


def check_pasta() -> Result:
    configured = settings.HERMIT_PASTA
    path = _executable(configured)
    if path is None:
        return Result(
            "pasta",
            False,
            f"pasta not found at {configured!r} (HERMIT_PASTA)",
            "apt-get install passt  (or set HERMIT_PASTA to the pasta binary's path)",
        )
    probe = _run([path, "--version"])
    if probe.returncode != 0:
        return Result(
            "pasta",
            False,
            f"{path} --version failed: {_last_line(probe.stderr + probe.stdout)}",
            "apt-get install --reinstall passt",
        )
    return Result("pasta", True, f"{path} runs")


def check_cgroups() -> Result:
    from sandboxes.backends import cgroups

    root = Path("/sys/fs/cgroup")
    parent = settings.HERMIT_CGROUP_PARENT
    try:
        version = cgroups.detect_version(root)
    except cgroups.CgroupError as exc:
        return Result("cgroups", False, str(exc), "mount -t cgroup2 none /sys/fs/cgroup")
    existed = (root / parent).exists() or (root / "memory" / parent).exists()
    try:
        paths = cgroups.create(
            root, parent, f"doctor-{os.getpid()}", memory_mb=64, cpu_millis=100, pids_max=16
        )
    except (cgroups.CgroupError, OSError) as exc:
        fix = (
            "run Hermit's worker as root"
            if os.geteuid() != 0
            else "mount -o remount,rw /sys/fs/cgroup  (in a container: --cgroupns=host and "
            "-v /sys/fs/cgroup:/sys/fs/cgroup:rw)"
        )
        return Result(
            "cgroups", False, f"cannot create a sandbox cgroup under {parent}: {exc}", fix
        )
    cgroups.remove(paths)
    for path in [] if existed else paths.values():  # a parent the probe made goes too
        with contextlib.suppress(OSError):
            os.rmdir(Path(path).parent)
    return Result("cgroups", True, f"v{version}, {parent} is writable (memory, pids, cpu limits)")


_DENIED_PROBE = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
# bpf(2) is on the deny list: under the filter it fails with EPERM (1).
result = libc.syscall(321, 0, 0, 0)
sys.exit(0 if result == -1 and ctypes.get_errno() == 1 else 3)
"""


def check_seccomp() -> Result:
    from sandboxes.backends.seccomp import seccomp_program, under_filter

    program = seccomp_program()
    if program is None:
        return Result(
            "seccomp",
            False,
            f"no seccomp filter for this machine ({os.uname().machine}): sandboxes would run "
            "without one",
            "run sandboxes on an x86_64 host",
        )
    with tempfile.NamedTemporaryFile(prefix="hermit-seccomp-", suffix=".bpf") as file:
        file.write(program)
        file.flush()
        probe = _run(under_filter(Path(file.name), [sys.executable, "-c", _DENIED_PROBE]))
    if probe.returncode != 0:
        reason = _last_line(probe.stderr) if probe.returncode != 3 else "a denied call got through"
        return Result(
            "seccomp",
            False,
            f"the filter ({len(program) // 8} instructions) does not load: {reason}",
            "use a kernel built with CONFIG_SECCOMP_FILTER=y, and run the worker as root",
        )
    return Result(
        "seccomp", True, f"the filter ({len(program) // 8} instructions) loads and denies"
    )


def check_runtime() -> Result:
    from sandboxes import runtime
    from sandboxes.openclaw.runtime import node_binary

    fix = manage("build_runtime")
    try:
        image = runtime.current_image()
    except runtime.RuntimeMissing as exc:
        return Result("runtime image", False, str(exc), fix)
    except DatabaseError:
        return Result("runtime image", False, "cannot read the runtime images (see database)")
    if not node_binary(Path(image.path)).is_file():
        return Result("runtime image", False, f"{image.path} has no Node binary", fix)
    return Result("runtime image", True, f"{image} at {image.path}, ready and current")


def _writable(directory: Path) -> str | None:
    """Return why a file cannot be written in ``directory``, or None if it can."""
    if not directory.is_dir():
        return (
            f"{directory} does not exist"
            if not directory.exists()
            else f"{directory} is not a directory"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".hermit-doctor-"):
            pass
    except OSError as exc:
        return f"cannot write in {directory}: {exc.strerror or exc}"
    return None


def check_data_dir() -> Result:
    path = Path(settings.HERMIT_DATA_DIR)
    problem = _writable(path)
    if problem:
        return Result(
            "data dir",
            False,
            f"{problem} (HERMIT_DATA_DIR)",
            f"mkdir -p {path} && chmod 711 {path}  (on a writable filesystem)",
        )
    return Result("data dir", True, f"{path} is writable")


def check_backup_storage() -> Result:
    from sandboxes.backups import storage

    restic = _executable("restic")
    if restic is None:
        return Result("backup storage", False, "restic is not installed", "apt-get install restic")
    if storage.s3_mode():
        return _check_bucket()
    path = Path(settings.HERMIT_BACKUP_DIR or Path(settings.HERMIT_DATA_DIR) / "backups")
    made_later = not path.exists() and path.parent.is_dir()
    problem = _writable(path.parent if made_later else path)
    if problem:
        return Result(
            "backup storage",
            False,
            f"{problem} (HERMIT_BACKUP_DIR)",
            f"mkdir -p {path} && chmod 700 {path}  (on a writable filesystem), or set "
            "HERMIT_BACKUP_S3_BUCKET",
        )
    where = f"{path} can be made" if made_later else f"{path} is writable"
    return Result("backup storage", True, f"{where}; restic at {restic}")


def _check_bucket() -> Result:
    from botocore.exceptions import BotoCoreError, ClientError

    from sandboxes.backups import storage

    bucket = settings.HERMIT_BACKUP_S3_BUCKET
    where = settings.HERMIT_BACKUP_S3_ENDPOINT or "AWS"
    try:
        storage.s3_client().head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("404", "NoSuchBucket", "NotFound"):
            return Result(
                "backup storage",
                False,
                f"bucket {bucket} does not exist at {where}",
                manage(
                    'shell -c "from sandboxes.backups.storage import ensure_bucket; '
                    'ensure_bucket()"'
                ),
            )
        return Result(
            "backup storage",
            False,
            f"bucket {bucket} at {where} refused: {code}",
            "check HERMIT_BACKUP_S3_ACCESS_KEY_ID and HERMIT_BACKUP_S3_SECRET_ACCESS_KEY",
        )
    except BotoCoreError as exc:
        return Result(
            "backup storage",
            False,
            f"cannot reach {where}: {redact(str(exc))}",
            "check HERMIT_BACKUP_S3_ENDPOINT and the network to it",
        )
    return Result("backup storage", True, f"bucket {bucket} at {where} is reachable")


def check_broker() -> Result:
    from kombu import Connection

    url = redact(str(settings.CELERY_BROKER_URL))
    if url.startswith("filesystem://"):
        folder = Path(settings.CELERY_BROKER_DIR) / "in"
        problem = _writable(folder)
        if problem:
            return Result(
                "broker", False, f"{problem} (the folder broker)", f"mkdir -p -m 700 {folder}"
            )
        return Result("broker", True, f"folder broker at {folder} is writable")
    try:
        with Connection(settings.CELERY_BROKER_URL, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=3)
    except Exception as exc:  # kombu raises the transport's own errors
        return Result(
            "broker",
            False,
            f"cannot reach the broker {url}: {redact(str(exc))}",
            "systemctl start redis-server  (and check REDIS_URL)",
        )
    return Result("broker", True, f"{url} is reachable")


def check_database() -> Result:
    from django.db import DEFAULT_DB_ALIAS, connections
    from django.db.migrations.executor import MigrationExecutor

    connection = connections[DEFAULT_DB_ALIAS]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        executor = MigrationExecutor(connection)
        pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except Exception as exc:  # the driver's own errors
        return Result(
            "database",
            False,
            f"cannot use the {connection.vendor} database: {redact(str(exc)).strip()}",
            "systemctl start postgresql  (and check DATABASE_URL)",
        )
    if pending:
        return Result(
            "database",
            False,
            f"{len(pending)} migrations not applied (first: {pending[0][0]})",
            manage("migrate"),
        )
    return Result("database", True, f"{connection.vendor} is reachable, migrations applied")


def check_disk(min_free_mb: int) -> Result:
    path = Path(settings.HERMIT_DATA_DIR)
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    free_mb = usage.free // (1024 * 1024)
    detail = f"{free_mb} MB free of {usage.total // (1024 * 1024)} MB under {path}"
    if free_mb < min_free_mb:
        return Result(
            "disk",
            False,
            f"{detail}, below {min_free_mb} MB",
            f"du -xh -d 2 {path} | sort -h | tail  (then remove what is not needed)",
        )
    return Result("disk", True, detail)


def available_ram_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    """Return MemAvailable from /proc/meminfo, in MB."""
    with contextlib.suppress(OSError):
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    raise OSError(f"no MemAvailable in {meminfo}")


def check_memory(min_available_mb: int) -> Result:
    available = available_ram_mb()
    detail = f"{available} MB of RAM available"
    if available < min_available_mb:
        return Result(
            "memory",
            False,
            f"{detail}, below {min_available_mb} MB",
            manage("sandbox sleep --all") + "  (puts running agents to sleep)",
        )
    return Result("memory", True, detail)
