"""CRIU for the local backend: check it works here, dump a sandbox's processes, restore them.

What is dumped is the sandbox's pid namespace (its init, pid 1 inside, and everything below it),
never pasta (the sandbox's network) nor bubblewrap's outer process: those are started afresh on
restore, and the restored tree is put into the new network namespace. So:

* the network namespace is external (``--external net[<inode>]:hermit-net`` on dump, the new one
  handed in as ``--inherit-fd fd[N]:hermit-net`` on restore); established TCP connections are
  closed (``--tcp-close``; clients reconnect) and no network lock is needed (``skip``);
* the bind mounts from the host (runtime, data dir, /usr, the run dir's files) are external
  (``--external mnt[]``); bubblewrap's root is a tmpfs CRIU cannot dump, so the restore is given
  a root-owned skeleton with the same mount points (:func:`build_root`) as ``--root``. The
  sandbox's mounts sit on the skeleton's directories: deleting one of them, even from another
  mount namespace, unmounts what sits on it, so a skeleton stays until its sandbox is gone;
* the gateway's log (stdout and stderr, a file outside the sandbox) is an external file, reopened
  by the backend and handed in on restore.

The io_uring calls fail under the sandbox's seccomp filter, so Node uses epoll (CRIU cannot dump
an io_uring). CRIU 4.2 or newer is needed on kernels >= 6.13 (``bin/system-deps`` installs Debian's
build with its own loader and libraries, and a wrapper: ``HERMIT_CRIU``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

MIN_VERSION = (4, 2)
NET_KEY = "hermit-net"
META_NAME = "hermit.json"  # the backend's own notes about an image, next to CRIU's files
DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
CAP_SYS_RESOURCE = 24
DEFAULT_PATHS = ("/opt/hermit/criu/criu", "criu")


class CriuError(Exception):
    """CRIU failed; the message says which step and quotes CRIU's own error lines."""


def binary(configured: str | None) -> str:
    """Return the criu to run: the configured one, else the system-deps install, else PATH."""
    for candidate in [configured] if configured else list(DEFAULT_PATHS):
        found = candidate if os.sep in candidate else shutil.which(candidate)
        if found and os.path.isfile(found) and os.access(found, os.X_OK):
            return found
    return configured or DEFAULT_PATHS[0]


@functools.cache
def support(criu: str) -> str:
    """Return "" if ``criu`` can checkpoint and restore here, else why not (checked once)."""
    if not (os.path.isfile(criu) and os.access(criu, os.X_OK)):
        return f"CRIU was not found at {criu}: run bin/system-deps (or set HERMIT_CRIU)."
    try:
        out = subprocess.run([criu, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"CRIU at {criu} does not run: {exc}"
    match = re.search(r"Version:\s*(\d+)\.(\d+)", out.stdout)
    if not match:
        return f"CRIU at {criu} does not run: {(out.stderr or out.stdout).strip()[:300]}"
    version = (int(match[1]), int(match[2]))
    if version < MIN_VERSION:
        return (
            f"CRIU {match[1]}.{match[2]} at {criu} is too old: this kernel needs CRIU "
            f"{MIN_VERSION[0]}.{MIN_VERSION[1]} or newer (run bin/system-deps)."
        )
    if os.geteuid() != 0:
        return "Checkpoints need root (CRIU reads and restores every process of a sandbox)."
    check = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=60)
    if check.returncode != 0 or "Looks good" not in check.stdout + check.stderr:
        lines = [ln for ln in (check.stdout + check.stderr).splitlines() if "Error" in ln]
        return f"`criu check` fails on this machine: {'; '.join(lines[-3:]) or check.returncode}"
    return ""


def has_sys_resource() -> bool:
    """Whether this process holds CAP_SYS_RESOURCE (CRIU reads other users' rlimits with it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def effective_caps() -> list[str]:
    """Return this process's effective capabilities as setpriv ``+name`` items."""
    mask = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            mask = int(line.split()[1], 16)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    return [f"+cap_{bit}" for bit in range(last + 1) if mask >> bit & 1]


def dump_argv(
    criu: str, pid: int, image_dir: Path, uid: int, net_inode: int, files: list[str]
) -> list[str]:
    """Return the argv that dumps the tree rooted at ``pid`` into ``image_dir`` and kills it.

    Without CAP_SYS_RESOURCE (some container hosts drop it) root may not read the rlimits of
    another user's processes, so CRIU then runs as the sandbox's uid with root's other
    capabilities (``--unprivileged``, which only skips checks that need the missing one).
    """
    argv = [
        criu,
        "dump",
        "--tree",
        str(pid),
        "--images-dir",
        str(image_dir),
        "--tcp-close",
        "--network-lock",
        "skip",
        "--file-locks",
        # No ghost files: a restore (as root) would recreate them at paths the sandbox may have
        # turned into links since. The backend refuses such sandboxes first; CRIU refuses too.
        "--ghost-limit",
        "0",
        "--external",
        f"net[{net_inode}]:{NET_KEY}",
        "--external",
        "mnt[]:m",
        *[arg for key in files for arg in ("--external", key)],
        "--log-file",
        DUMP_LOG,
        "-v2",
    ]
    if has_sys_resource():
        return argv
    caps = ",".join(effective_caps())
    setpriv = [
        shutil.which("setpriv") or "/usr/bin/setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        "--",
    ]
    return [*setpriv, *argv, "--unprivileged"]


def restore_argv(
    criu: str, image_dir: Path, root: Path, pidfile: Path, net_fd: int, file_fds: dict[str, int]
) -> list[str]:
    """Return the argv that restores ``image_dir`` detached onto the skeleton ``root`` (see
    :func:`build_root`), writing the init's host pid to ``pidfile``."""
    return [
        criu,
        "restore",
        "--images-dir",
        str(image_dir),
        "--restore-detached",
        "--pidfile",
        str(pidfile),
        "--root",
        str(root),
        "--tcp-close",
        "--file-locks",
        "--external",
        "mnt[]",
        "--manage-cgroups=ignore",
        "--inherit-fd",
        f"fd[{net_fd}]:{NET_KEY}",
        *[arg for key, fd in file_fds.items() for arg in ("--inherit-fd", f"fd[{fd}]:{key}")],
        "--log-file",
        RESTORE_LOG,
        "-v2",
    ]


def external_file_key(pid: int, fd: int) -> str:
    """Return CRIU's key for the file open at ``fd`` of ``pid`` (``file[<mnt_id>:<inode>]``)."""
    mnt_id = 0
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("mnt_id:"):
            mnt_id = int(line.split()[1])
    inode = os.stat(f"/proc/{pid}/fd/{fd}").st_ino
    return f"file[{mnt_id:x}:{inode:x}]"


def log_tail(image_dir: Path, name: str, lines: int = 4) -> str:
    """Return CRIU's last error lines from its log in ``image_dir``."""
    try:
        text = (image_dir / name).read_text(errors="replace")
    except OSError:
        return "(no CRIU log)"
    errors = [ln.strip() for ln in text.splitlines() if "Error" in ln and "RLIMIT_NOFILE" not in ln]
    if errors:
        return " | ".join(errors[-lines:])
    last = text.strip().splitlines()
    return last[-1] if last else "(empty CRIU log)"


def build_root(bwrap_argv: list[str], root: Path) -> None:
    """Make ``root`` a skeleton of the root bubblewrap builds from ``bwrap_argv``: every mount
    point (directory or empty file), directory and symlink, root's, mode 0755/0644.

    bubblewrap's root is a tmpfs below a directory of another tmpfs, which CRIU cannot dump; on
    restore CRIU mounts this skeleton as the sandbox's root instead (read-only, as before). It
    must not be removed while the restored sandbox runs (that would unmount its mounts)."""
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)  # noqa: S103 - root's, read-only in the sandbox, like /usr

    def make_dir(inside: str) -> None:
        path = root / inside.lstrip("/")
        path.mkdir(mode=0o755, parents=True, exist_ok=True)

    def make_file(inside: str) -> None:
        path = root / inside.lstrip("/")
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.touch(mode=0o644)

    args = bwrap_argv[1:]
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--bind", "--ro-bind", "--ro-bind-try", "--bind-try", "--dev-bind"):
            source, dest = args[i + 1], args[i + 2]
            if os.path.isdir(source):
                make_dir(dest)
            elif os.path.exists(source):
                make_file(dest)
            i += 3
        elif arg == "--symlink":
            target, dest = args[i + 1], args[i + 2]
            link = root / dest.lstrip("/")
            link.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(target)
            i += 3
        elif arg in ("--dir", "--tmpfs", "--proc", "--dev", "--mqueue"):
            make_dir(args[i + 1])
            i += 2
        elif arg in ("--remount-ro", "--chdir", "--perms", "--size", "--hostname", "--seccomp"):
            i += 2
        elif arg in ("--cap-add", "--cap-drop", "--uid", "--gid", "--setenv", "--unsetenv"):
            i += 3 if arg == "--setenv" else 2
        elif arg == "--":
            break
        else:
            i += 1


def write_meta(image_dir: Path, meta: dict[str, Any]) -> None:
    path = image_dir / META_NAME
    path.write_text(json.dumps(meta, indent=1))
    os.chmod(path, 0o600)


def read_meta(image_dir: Path) -> dict[str, Any]:
    """Return the backend's notes about an image; CriuError if they are missing or unreadable."""
    try:
        meta = json.loads((image_dir / META_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise CriuError(
            f"the checkpoint at {image_dir} is incomplete ({META_NAME}: {exc})"
        ) from exc
    if not isinstance(meta, dict):
        raise CriuError(f"the checkpoint at {image_dir} is corrupt ({META_NAME})")
    return meta


def image_size(image_dir: Path) -> int:
    """Return the bytes the image's files take (the skeleton root's are empty)."""
    total = 0
    for dirpath, _dirs, files in os.walk(image_dir):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total
