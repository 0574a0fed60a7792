"""The local backend: each sandbox is an OpenClaw gateway in bubblewrap + pasta + cgroups.

Process tree of one sandbox (host view)::

    bash  (supervisor, root, detached: starts both halves, reaps them, writes <run_dir>/exit_code)
     ├─ pasta  (uid P, own user+net namespace; the only link from that netns to the host)
     │   └─ sleep  (holds the namespaces; before it, a bash step adds the blocked routes)
     └─ bwrap  (root, outside: mount/pid/ipc/uts/cgroup namespaces, joins pasta's netns)
         └─ bash init (pid 1 inside, uid U, no capabilities: reaps, forwards SIGTERM)
             └─ node openclaw.mjs gateway run   (the "main" process, pid 2 inside)

* ``U = uid_base + sandbox_id`` is a host uid nobody else uses; the data dir is chowned to it.
  The sandbox's processes run as U in the host's user namespace, with no capabilities, no new
  privileges (bubblewrap sets no_new_privs, setpriv empties the bounding set) and a seccomp
  filter that also refuses new user namespaces. Everything the sandbox sees is in namespaces
  root made, so U has no power over any of them (its mounts, its network).
* ``P = net_uid_base + sandbox_id`` runs pasta, which creates a user and a network namespace
  (owned by P, so U, another uid, holds no capability in them) and forwards exactly two things:
  host ``127.0.0.1:<host_port>`` -> sandbox ``127.0.0.1:<gateway_port>`` (``-t``), and sandbox
  ``127.0.0.1:<ai_gateway_port>`` -> host ``127.0.0.1:<ai_gateway_port>`` (``-T``). No other port in
  either direction. Without ``spec.internet`` the tap interface stays down (no route at all); with
  it pasta configures it (``--config-net``) but never maps the gateway address to the host
  (``--no-map-gw``), so the host's loopback stays out of reach.
* The supervisor writes its own pid into the sandbox's cgroups first, so pasta, bwrap, the
  gateway and every process they start are capped and accounted together.
* Root never follows a path the sandbox controls. The sandbox owns its data dir and may plant any
  link there, so root touches it only through ``safefs`` (``O_NOFOLLOW`` directory fds, ``*at``
  calls): the chown walk before a start, the directories made for the gateway, the size walk in
  ``stats``. Files root writes for the sandbox (its /etc, ``spec.files`` such as the OpenClaw
  config, the seccomp filter, the log and exit code) live in the root-owned run dir and are
  mounted read-only.
* Commands run with ``exec`` enter the sandbox's namespaces and cgroups and become its user with
  no capabilities (setpriv, as the gateway), under the same seccomp filter, in a session of their
  own inside the sandbox's pid namespace (so a checkpoint can save what they leave running).
* A sandbox holding deleted files (open, mapped, cwd) is never checkpointed: CRIU would save them
  as ghost files that a root restore recreates at their old paths, which may be links by then.
* Everything needed to re-attach (pids with their start times, ports, cgroup paths, run dir) is in
  the state dict ``start`` returns; no method relies on memory of an earlier call.
* Hibernation (``checkpoint``/``restore``, see ``criu.py``): CRIU dumps the pid namespace (init
  and below) to a root-owned image directory, then pasta and the cgroups go; a restore starts a
  fresh pasta on the same host port and puts the restored tree into its network namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandboxes.backends import cgroups, criu, safefs, volumes
from sandboxes.backends.base import (
    BackendError,
    CheckpointImage,
    ExecResult,
    PollResult,
    ProcessInfo,
    Progress,
    SandboxBackend,
    SandboxSpec,
    Stats,
    sandbox_id_of,
    sandbox_name,
)
from sandboxes.backends.seccomp import seccomp_program, under_filter
from sandboxes.openclaw.runtime import node_binary, openclaw_entry

DNS_FORWARD_ADDR = "169.254.1.53"  # pasta answers DNS here when the sandbox has internet
LOG_NAME = "gateway.log"
EXIT_NAME = "exit_code"
SECCOMP_NAME = "seccomp.bpf"
FILES_NAME = "files"  # spec.files, mounted read-only
NET_PIDS_NAME = "net.pids"  # "<pasta pid> <holder pid>", written by the supervisor
RESTORED_PID_NAME = "restored.pid"  # the restored init's host pid, written by CRIU
ROOTS_NAME = "roots"  # skeleton roots of restored sandboxes (criu.build_root), one per restore
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
IMAGE_NAME = re.compile(r"^(.+)-\d{8}T\d{6}-[^/]+$")  # <sandbox>-<UTC time>-<random>
SANDBOX_SPLIT = "--hermit-sandbox--"  # separates pasta's argv from the sandbox's

# Detached start: $1 log, rest = the supervisor's argv. The subshell execs the supervisor in the
# background and the outer sh exits at once, so the sandbox outlives the Python process.
_LAUNCH = r"""
log="$1"; shift
( exec "$@" ) </dev/null >>"$log" 2>&1 &
echo $!
"""
# The supervisor (bash, root). $1 exit file, then pasta's argv, SANDBOX_SPLIT, the sandbox's.
# It joins the cgroups, starts pasta (whose command adds the blocked routes, then holds the
# namespaces), waits for the holder, then runs the sandbox in pasta's netns: bwrap (a start) or
# `criu restore` (HERMIT_RESTORE_PIDFILE set: CRIU gets the netns as fd 5 and the log as fd 6,
# restores detached, and the supervisor waits for the restored init). When either half ends,
# the other is stopped, and the sandbox's exit code (unknown for a restored one) is recorded.
_SUPERVISOR = r"""
exitf=$1; shift
for f in $HERMIT_CGROUP_PROCS; do echo $$ > "$f" || exit 125; done
unset HERMIT_CGROUP_PROCS
args=("$@"); split=0
while [[ ${args[split]} != --hermit-sandbox-- ]]; do ((split++)); done
"${args[@]:0:split}" &
pasta=$! holder=
for ((i = 0; i < 1500; i++)); do
  read -r holder _ < "/proc/$pasta/task/$pasta/children" 2>/dev/null
  [[ -n $holder && $(cat "/proc/$holder/comm" 2>/dev/null) == sleep ]] && break
  holder=
  kill -0 "$pasta" 2>/dev/null || break
  sleep 0.01
done
record() { echo "$1" > "$exitf.tmp" && mv "$exitf.tmp" "$exitf"; }
if [[ -z $holder ]]; then
  echo "The sandbox's network (pasta) did not start."
  kill "$pasta" 2>/dev/null; wait; record 124; exit 124
fi
echo "$pasta $holder" > "$HERMIT_NET_PIDS"
ns=/proc/$holder/ns/net
if [[ -n ${HERMIT_RESTORE_PIDFILE-} ]]; then
  "${args[@]:split+1}" 5<"$ns" 6>&1
  rc=$?
  init=$(cat "$HERMIT_RESTORE_PIDFILE" 2>/dev/null)
  if ((rc == 0)) && [[ -n $init ]]; then
    while kill -0 "$init" 2>/dev/null && kill -0 "$pasta" 2>/dev/null; do sleep 0.5; done
    kill -KILL "$init" 2>/dev/null
    rc=
  fi
else
  if [[ -n $HERMIT_SECCOMP ]] && ! exec 9<"$HERMIT_SECCOMP"; then
    kill "$pasta"; record 126; exit 126
  fi
  nsenter --net="$ns" "${args[@]:split+1}" &
  sandbox=$!
  exec 9<&-
  wait -n "$pasta" "$sandbox"; rc=$?
  if kill -0 "$sandbox" 2>/dev/null; then
    echo "The sandbox's network (pasta) ended; stopping the sandbox."
    kill "$sandbox"; wait "$sandbox"; rc=$?
  fi
fi
kill "$pasta" 2>/dev/null; wait "$pasta" 2>/dev/null
[[ -n $rc ]] && record "$rc"
exit 0
"""
# pasta's command, as root of pasta's user namespace: close pasta's leaked descriptors (among
# them the host-side listening socket of the port forward), add "prohibit" routes
# (HERMIT_BLOCKED_NETS) to the sandbox's network namespace, which the sandbox itself (uid U,
# with no capability there) cannot remove, then hold the namespaces.
_CLOSE_FDS = r"""for fd in /proc/self/fd/*; do fd=${fd##*/}
  if ((fd > 2)); then eval "exec $fd>&-"; fi
done
for net in $HERMIT_BLOCKED_NETS; do "$HERMIT_IP" route add prohibit "$net" || exit 126; done
unset HERMIT_BLOCKED_NETS HERMIT_IP; exec sleep infinity
"""
# pid 1 of the sandbox (bash as uid U): stdin from the sandbox's own /dev/null (CRIU restores
# only files it can reach from inside), runs the command, reaps orphans, forwards SIGTERM, exits
# with the command's status.
_INIT = r"""exec </dev/null
trap 'kill -TERM "$child" 2>/dev/null' TERM INT HUP
"$@" & child=$!
while :; do wait "$child"; rc=$?; kill -0 "$child" 2>/dev/null || break; done
exit "$rc"
"""
# Cloud metadata endpoints: never reachable from a sandbox, even with internet.
METADATA_NETS = ("169.254.169.254/32", "fd00:ec2::254/128")
# Join the sandbox's cgroups, then exec the rest (used by exec()). A command run this way is
# the OOM killer's first choice, so a runaway helper dies before the gateway does.
_JOIN = r"""for f in $HERMIT_CGROUP_PROCS; do echo $$ > "$f" || exit 125; done
echo 1000 > /proc/self/oom_score_adj; unset HERMIT_CGROUP_PROCS; exec "$@"
"""


def _setting(name: str, default: Any) -> Any:
    """Read a Django setting if Django is configured, else return ``default``."""
    try:
        from django.conf import settings

        if settings.configured or os.environ.get("DJANGO_SETTINGS_MODULE"):
            return getattr(settings, name, default)
        return default
    except ImportError:
        return default


class LocalBackend(SandboxBackend):
    """Run sandboxes on this machine with bubblewrap, pasta and cgroups. Needs root."""

    name = "local"

    def __init__(
        self,
        *,
        bwrap: str | None = None,
        pasta: str | None = None,
        run_root: Path | None = None,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        cgroup_parent: str | None = None,
        uid_base: int | None = None,
        start_timeout: float | None = None,
        ready_timeout: float | None = None,
        tmp_size_mb: int = 256,
        shm_size_mb: int = 64,
        net_uid_base: int | None = None,
        start_cpu_seconds: float | None = None,
        checkpoint_dir: Path | None = None,
        criu_path: str | None = None,
        volume_root: Path | None = None,
    ) -> None:
        self.bwrap = _resolve(bwrap or _setting("HERMIT_BWRAP", "bwrap"))
        self.pasta = _resolve(pasta or _setting("HERMIT_PASTA", "pasta"))
        data_dir = Path(_setting("HERMIT_DATA_DIR", "var"))
        self.run_root = Path(run_root or _setting("HERMIT_SANDBOX_RUN_DIR", data_dir / "run"))
        self.cgroup_root = Path(cgroup_root)
        self.cgroup_parent = cgroup_parent or _setting("HERMIT_CGROUP_PARENT", "hermit")
        self.uid_base = uid_base if uid_base is not None else _setting("HERMIT_UID_BASE", 200_000)
        self.start_timeout = float(start_timeout or _setting("HERMIT_START_TIMEOUT", 60))
        self.ready_timeout = float(ready_timeout or _setting("HERMIT_READY_TIMEOUT", 30))
        self.tmp_size_mb = tmp_size_mb
        self.shm_size_mb = shm_size_mb  # /dev/shm, only for a sandbox with the browser
        # pasta's uids: another range, so no sandbox uid owns (and so commands) a netns.
        self.net_uid_base = (
            net_uid_base
            if net_uid_base is not None
            else int(_setting("HERMIT_NET_UID_BASE", self.uid_base + 1_000_000_000))
        )
        self.start_cpu_seconds = float(
            start_cpu_seconds or _setting("HERMIT_START_CPU_SECONDS", 60)
        )
        self.checkpoint_dir = Path(
            checkpoint_dir or _setting("HERMIT_CHECKPOINT_DIR", "") or data_dir / "checkpoints"
        )
        self.criu = criu.binary(criu_path or _setting("HERMIT_CRIU", "") or None)
        # None: <HERMIT_DATA_DIR>/sandboxes, read at each call (sandboxes.backends.volumes).
        self.volume_root = Path(volume_root) if volume_root is not None else None

    # -- the data volume (a directory on this host) and the read-only files ---------------

    def volume(self, sandbox_id: int) -> Path:
        return volumes.path(self.volume_root, sandbox_id)

    def prepare_volume(self, sandbox_id: int, subdirs: Iterable[str] = ()) -> Path:
        return volumes.prepare(self.volume(sandbox_id), subdirs)

    def remove_volume(self, sandbox_id: int) -> None:
        volumes.remove(self.volume(sandbox_id))

    def write_files(self, spec: SandboxSpec, state: dict[str, Any], files: dict[str, str]) -> None:
        """Overwrite each file (root's, in the root-owned run dir) keeping its inode: the
        sandbox has it bind-mounted, and a new file under the same name would never reach it.
        Every file is opened before any is written, so a refusal changes none."""
        if not state.get("run_dir") or not self.poll(spec, state).running:
            raise BackendError(
                f"Sandbox {spec.name} is not running, so its files stay as they are."
            )
        folder = Path(state["run_dir"]) / FILES_NAME
        opened: list[tuple[int, bytes]] = []
        try:
            for inside, text in files.items():
                try:
                    fd = os.open(folder / _file_key(spec, inside), os.O_WRONLY | os.O_NOFOLLOW)
                except FileNotFoundError:
                    raise BackendError(
                        f"{inside} is not one of sandbox {spec.name}'s read-only files."
                    ) from None
                opened.append((fd, text.encode()))
            for fd, data in opened:
                os.ftruncate(fd, 0)
                written = 0
                while written < len(data):
                    written += os.pwrite(fd, data[written:], written)
        finally:
            for fd, _ in opened:
                os.close(fd)

    # -- start -------------------------------------------------------------------------------

    def start(self, spec: SandboxSpec) -> Iterator[Progress]:
        """Launch the sandbox and wait for its gateway's port, then ``/readyz``.

        Anything still running in a cgroup of the same name (a previous instance) is killed
        first: one sandbox never runs twice. The Progress right after launch and the last one
        carry the state. On failure everything started is killed and BackendError carries the
        last log lines. ``spec.extra`` may set ``command`` (argv instead of the gateway),
        ``start_timeout``, ``ready_timeout`` and ``ready_path``.
        """
        yield Progress(2, "Checking the sandbox tools")
        self._check_tools(spec)
        uid = self.uid_base + spec.sandbox_id
        run_dir = self.run_root / spec.name
        state: dict[str, Any] = {}
        try:
            yield Progress(5, "Applying memory, CPU and process limits")
            # First, so no earlier instance runs (and races the chown walk) while files are
            # handed over to the sandbox uid.
            paths = self._fresh_cgroups(spec)
            yield Progress(8, "Preparing the sandbox's files")
            self._prepare_dirs(spec, run_dir, uid)
            state = self._launch(spec, run_dir, uid, paths)
            yield Progress(15, "Sandbox launched, starting the agent gateway", state=dict(state))
            yield from self._wait_listening(spec, state)
            yield Progress(88, "Gateway is listening, waiting until it is ready")
            self._wait_ready(spec, state)
        except BaseException as exc:
            self._teardown(spec, state)
            if isinstance(exc, BackendError):
                raise BackendError(f"{exc}{self._log_tail(run_dir)}") from None
            if isinstance(exc, cgroups.CgroupError | OSError):
                raise BackendError(f"Could not start sandbox {spec.name}: {exc}") from exc
            raise
        yield Progress(100, "Sandbox is running", state=dict(state))

    def _check_tools(self, spec: SandboxSpec) -> None:
        for label, path, package in (
            ("bubblewrap (bwrap)", self.bwrap, "bubblewrap"),
            ("pasta", self.pasta, "passt"),
        ):
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                raise BackendError(
                    f"{label} was not found at {path}: install the {package} package "
                    f"or point the local backend at it."
                )
        if "command" not in spec.extra and not node_binary(spec.runtime_dir).is_file():
            raise BackendError(
                f"The OpenClaw runtime is missing at {spec.runtime_dir}: "
                f"run `manage.py build_runtime` first."
            )
        if not spec.data_dir.is_dir():
            raise BackendError(f"The sandbox data directory {spec.data_dir} does not exist.")
        if os.geteuid() != 0:
            raise BackendError("The local backend must run as root (it manages cgroups and uids).")

    def _prepare_dirs(self, spec: SandboxSpec, run_dir: Path, uid: int) -> None:
        """Write the sandbox's /etc, rotate its log, hand its data dir to its uid."""
        etc = run_dir / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_root, 0o755)  # noqa: S103 - root's; the run dirs below are closed
        # Only root and the sandbox's uid (which bwrap and the seccomp step open files as)
        # may enter its run dir: its log and config are nobody else's business.
        os.chown(run_dir, 0, uid)
        os.chmod(run_dir, 0o750)  # noqa: S103 - group = the sandbox uid only
        os.chmod(etc, 0o755)  # noqa: S103 - the sandbox uid reads /etc from here
        home = spec.env.get("HOME", str(spec.data_dir))
        files = {
            "passwd": f"hermit:x:{uid}:{uid}:Hermit sandbox:{home}:/bin/sh\n",
            "group": f"hermit:x:{uid}:\n",
            "hosts": f"127.0.0.1 localhost {spec.name}\n::1 localhost ip6-localhost\n",
            "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
            "resolv.conf": f"nameserver {DNS_FORWARD_ADDR}\n" if spec.internet else "",
        }
        for name, text in files.items():
            (etc / name).write_text(text)
            os.chmod(etc / name, 0o644)
        program = seccomp_program()
        if program:
            (run_dir / SECCOMP_NAME).write_bytes(program)
            os.chmod(run_dir / SECCOMP_NAME, 0o644)
        self._write_files(spec, run_dir, uid)
        _open_log(run_dir, int(_setting("HERMIT_GATEWAY_LOG_MAX_BYTES", 10 * 1024 * 1024)))
        (run_dir / EXIT_NAME).unlink(missing_ok=True)
        shutil.rmtree(run_dir / ROOTS_NAME, ignore_errors=True)  # a restored instance's, gone
        try:
            safefs.chown_tree(spec.data_dir, uid, uid, root_mode=0o700)
        except OSError as exc:
            raise BackendError(f"The sandbox data directory {spec.data_dir}: {exc}") from exc
        for parent in spec.data_dir.resolve().parents:
            if not os.stat(parent).st_mode & 0o001:
                raise BackendError(
                    f"{parent} is not searchable by other users, so the sandbox uid cannot "
                    f"reach its data directory: chmod o+x {parent}"
                )

    def _write_files(self, spec: SandboxSpec, run_dir: Path, uid: int) -> None:
        """Write ``spec.files`` into the run dir (root's), readable by the sandbox's group only."""
        files = run_dir / FILES_NAME
        shutil.rmtree(files, ignore_errors=True)
        files.mkdir()
        os.chmod(files, 0o755)  # noqa: S103 - the sandbox uid opens its files from here
        for inside, text in spec.files.items():
            host = files / _file_key(spec, inside)
            host.write_text(text)
            os.chown(host, 0, uid)
            os.chmod(host, 0o640)

    def _fresh_cgroups(self, spec: SandboxSpec) -> cgroups.CgroupPaths:
        def create() -> cgroups.CgroupPaths:
            return cgroups.create(
                self.cgroup_root,
                self.cgroup_parent,
                spec.name,
                spec.memory_mb,
                spec.cpu_millis,
                spec.pids_max,
            )

        paths = create()
        if cgroups.pids(paths):  # left over from a crash: nothing may run twice
            cgroups.kill_all(paths)
        cgroups.remove(paths)  # recreate, so OOM and CPU counters start at zero
        return create()

    def _launch(
        self,
        spec: SandboxSpec,
        run_dir: Path,
        uid: int,
        paths: cgroups.CgroupPaths,
        *,
        host_port: int | None = None,
        restore: list[str] | None = None,
    ) -> dict[str, Any]:
        """Start the supervisor: pasta, then bwrap (or ``restore``, a `criu restore` argv)."""
        host_port = host_port or _free_port()
        net_uid = self.net_uid_base + spec.sandbox_id
        pasta = [
            "setpriv",
            f"--reuid={net_uid}",
            f"--regid={net_uid}",
            "--clear-groups",
            *self.pasta_args(spec, host_port),
            "--",
            _resolve("bash"),
            "-c",
            _CLOSE_FDS,
            "hermit-closefds",
        ]
        if restore is None:
            sandbox = [*self.bwrap_args(spec, run_dir), "--", *self.init_args(uid, spec)]
        else:
            sandbox = restore
        env = self.sandbox_env(spec)
        env["HERMIT_CGROUP_PROCS"] = " ".join(cgroups.procs_files(paths))
        env["HERMIT_BLOCKED_NETS"] = " ".join(self.blocked_nets(spec))
        env["HERMIT_IP"] = _resolve("ip")
        env["HERMIT_SECCOMP"] = str(run_dir / SECCOMP_NAME) if seccomp_program() else ""
        env["HERMIT_NET_PIDS"] = str(run_dir / NET_PIDS_NAME)
        if restore is not None:
            env["HERMIT_RESTORE_PIDFILE"] = str(run_dir / RESTORED_PID_NAME)
        (run_dir / NET_PIDS_NAME).unlink(missing_ok=True)
        (run_dir / RESTORED_PID_NAME).unlink(missing_ok=True)
        log = run_dir / LOG_NAME
        exit_file = run_dir / EXIT_NAME
        supervisor_argv = [
            _resolve("bash"),
            "-c",
            _SUPERVISOR,
            "hermit-supervisor",
            str(exit_file),
            *pasta,
            SANDBOX_SPLIT,
            *sandbox,
        ]
        out = subprocess.run(
            ["/bin/sh", "-c", _LAUNCH, "hermit-launch", str(log), *supervisor_argv],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            start_new_session=True,
            timeout=10,
            check=True,
        )
        supervisor = int(out.stdout.strip())
        state: dict[str, Any] = {
            "backend": self.name,
            "uid": uid,
            "host_port": host_port,
            "gateway_port": spec.gateway_port,
            "run_dir": str(run_dir),
            "cgroups": paths,
            "supervisor": [supervisor, _start_time(supervisor)],
            "started_at": datetime.now(UTC).isoformat(),
        }
        wait = 10.0 if restore is None else float(_setting("HERMIT_RESTORE_TIMEOUT", 120))
        state.update(self._find_tree(supervisor, run_dir, restored=restore is not None, wait=wait))
        return state

    def _find_tree(
        self, supervisor: int, run_dir: Path, *, restored: bool, wait: float
    ) -> dict[str, Any]:
        """Find pasta (from the supervisor's note), then init (pid 1 inside: bwrap's child, or
        the pid CRIU wrote) and main (init's child); return their pids with start times."""
        exit_file = run_dir / EXIT_NAME
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            found = self._tree_now(supervisor, run_dir, restored)
            if found:
                return found
            if exit_file.exists() or not _live([supervisor, _start_time(supervisor)]):
                what = "restored" if restored else "set up"
                raise BackendError(f"The sandbox exited while it was being {what}.")
            time.sleep(0.02)
        raise BackendError(f"The sandbox's processes did not appear within {wait:.0f} s.")

    def _tree_now(self, supervisor: int, run_dir: Path, restored: bool) -> dict[str, Any] | None:
        try:
            pasta = int((run_dir / NET_PIDS_NAME).read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None
        init = None
        if restored:
            with contextlib.suppress(OSError, ValueError):
                init = int((run_dir / RESTORED_PID_NAME).read_text().strip())
        else:
            for child in _children(supervisor):
                if child != pasta:
                    init = next((k for k in _children(child) if _ns_pid(k) == 1), None)
        if not init or _ns_pid(init) != 1:
            return None
        kids = _children(init)
        if not kids:
            return None
        main = kids[0]
        return {
            "pasta": [pasta, _start_time(pasta)],
            "init": [init, _start_time(init)],
            "main": [main, _start_time(main)],
        }

    def pasta_args(self, spec: SandboxSpec, host_port: int) -> list[str]:
        """Return pasta's argv: one forward in, at most one out, internet only if allowed."""
        outbound = str(spec.ai_gateway_port) if spec.ai_gateway_port else "none"
        args = [
            self.pasta,
            "--foreground",
            "--quiet",
            "--tcp-ports",
            f"127.0.0.1/{host_port}:{spec.gateway_port}",
            "--tcp-ns",
            outbound,
            "--udp-ports",
            "none",
            "--udp-ns",
            "none",
        ]
        if spec.internet:
            args += ["--config-net", "--no-map-gw", "--dns-forward", DNS_FORWARD_ADDR]
        return args

    def blocked_nets(self, spec: SandboxSpec) -> list[str]:
        """Return the networks a sandbox with internet must not reach through pasta.

        pasta makes the sandbox's outbound connections from the host, so without these routes a
        sandbox with internet could reach services on the host's non-loopback addresses (say a
        Docker bridge) and cloud metadata. Blocked: every address on the host's interfaces (as
        of this start), the metadata endpoints, and ``HERMIT_SANDBOX_BLOCKED_NETS``. Without
        internet the sandbox has no route at all, so nothing needs blocking.
        """
        if not spec.internet:
            return []
        extra = list(_setting("HERMIT_SANDBOX_BLOCKED_NETS", []))
        return [*_host_addresses(), *METADATA_NETS, *extra]

    def bwrap_args(self, spec: SandboxSpec, run_dir: Path) -> list[str]:
        """Return bwrap's argv (without the command). The network namespace is pasta's.

        bwrap runs as root without a user namespace (CRIU cannot restore nested ones), keeping
        only CAP_SETUID and CAP_SETGID for the command, which is :meth:`init_args`: setpriv
        turns it into the sandbox uid with no capabilities at all before anything else runs.
        """
        etc = run_dir / "etc"
        binds: list[tuple[str, str, str]] = [("--ro-bind", "/usr", "/usr")]
        for name in ("passwd", "group", "hosts", "nsswitch.conf", "resolv.conf"):
            binds.append(("--ro-bind", str(etc / name), f"/etc/{name}"))
        for shared in ("ssl", "ca-certificates", "alternatives", "localtime", "ld.so.cache"):
            binds.append(("--ro-bind-try", f"/etc/{shared}", f"/etc/{shared}"))
        if spec.browser:  # Chromium (under the read-only /usr) renders text with fontconfig
            binds.append(("--ro-bind-try", "/etc/fonts", "/etc/fonts"))
        for inside in spec.files:
            binds.append(("--ro-bind", str(run_dir / FILES_NAME / _file_key(spec, inside)), inside))
        runtime = str(spec.runtime_dir)
        binds.append(("--ro-bind", runtime, runtime))
        binds.append(("--bind", str(spec.data_dir), str(spec.data_dir)))
        # Directories bwrap would make for mount points are root's and 0700 when it runs as
        # root: make every parent first, world-searchable (the files keep their own modes).
        parents = sorted(
            {str(p) for _, _, dest in binds for p in Path(dest).parents if str(p) != "/"},
            key=lambda path: (path.count("/"), path),
        )
        args = [
            self.bwrap,
            "--cap-add",
            "CAP_SETUID",
            "--cap-add",
            "CAP_SETGID",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            spec.name,
            "--as-pid-1",
            "--die-with-parent",
            "--new-session",
            *(["--seccomp", "9"] if seccomp_program() else []),  # fd 9: the supervisor's
            "--size",
            str(self.tmp_size_mb * 1024 * 1024),
            "--perms",
            "1777",
            "--tmpfs",
            "/tmp",  # noqa: S108 - the sandbox's private tmpfs, not the host's /tmp
        ]
        for parent in parents:
            args += ["--perms", "0755", "--dir", parent]
        for top in ("bin", "sbin", "lib", "lib32", "lib64"):
            host = Path("/") / top
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), str(host)]
            elif host.is_dir():
                args += ["--ro-bind", str(host), str(host)]
        for kind, source, dest in binds:
            args += [kind, source, dest]
        args += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
        ]
        if spec.browser:
            # Chromium's shared memory: a small private tmpfs, charged to the sandbox's cgroup
            # like /tmp (OpenClaw also passes --disable-dev-shm-usage, so most of it goes to /tmp).
            args += ["--size", str(self.shm_size_mb * 1024 * 1024), "--perms", "1777"]
            args += ["--tmpfs", "/dev/shm"]  # noqa: S108 - the sandbox's own, not the host's
        args += [
            "--chdir",
            str(spec.data_dir),
            # bwrap's root and /dev are tmpfs: make them read-only, so the data dir and /tmp
            # (separate mounts) are the only writable places.
            "--remount-ro",
            "/dev",
            "--remount-ro",
            "/",
        ]
        return args

    def init_args(self, uid: int, spec: SandboxSpec) -> list[str]:
        """Return pid 1's argv: become ``uid`` with no capabilities, then run the command under
        a small bash init (``_INIT``) that reaps and forwards SIGTERM."""
        return [
            "/usr/bin/setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            "/usr/bin/bash",
            "-c",
            _INIT,
            "hermit-init",
            *self.command(spec),
        ]

    def command(self, spec: SandboxSpec) -> list[str]:
        """Return the sandbox's main command: the gateway, or ``spec.extra["command"]``."""
        custom = spec.extra.get("command")
        if custom:
            return [str(part) for part in custom]
        node = node_binary(spec.runtime_dir)
        entry = openclaw_entry(spec.runtime_dir)
        return [str(node), str(entry), "gateway", "run", "--port", str(spec.gateway_port)]

    def sandbox_env(self, spec: SandboxSpec) -> dict[str, str]:
        """Return the environment of processes in the sandbox: PATH plus ``spec.env`` only.

        Built from scratch: the portal's own environment (database URLs, keys) never leaks in.
        """
        node_dir = node_binary(spec.runtime_dir).parent
        env = {"PATH": f"{node_dir}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        env.update(spec.env)
        return env

    def _wait_listening(self, spec: SandboxSpec, state: dict[str, Any]) -> Iterator[Progress]:
        """Wait until the gateway listens. A slow start is judged by the CPU time it got, not
        by wall time alone: it fails once the sandbox has used ``start_cpu_seconds`` of CPU
        without opening the port, or after a hard wall cap (5 x the start timeout, or
        ``spec.extra["start_timeout"]`` exactly), so a boot starved by a busy machine goes on."""
        cpu_limit = float(spec.extra.get("start_cpu_seconds", self.start_cpu_seconds))
        wall_cap = float(spec.extra.get("start_timeout", 5 * self.start_timeout))
        started = time.monotonic()
        cpu_before = cgroups.cpu_seconds(state["cgroups"])
        last_percent = 15
        while not _listening(state["init"][0], spec.gateway_port):
            elapsed = time.monotonic() - started
            if not self.poll(spec, state).running:
                raise BackendError(
                    f"Sandbox {spec.name} exited before its gateway opened port "
                    f"{spec.gateway_port} ({self._exit_text(state)})."
                )
            used = cgroups.cpu_seconds(state["cgroups"]) - cpu_before
            if elapsed > wall_cap:
                raise BackendError(
                    f"Sandbox {spec.name}'s gateway did not open port {spec.gateway_port} "
                    f"within {wall_cap:.0f} s (it used {used:.0f} CPU-seconds)."
                )
            if used > cpu_limit:
                raise BackendError(
                    f"Sandbox {spec.name}'s gateway did not open port {spec.gateway_port} "
                    f"after {used:.0f} CPU-seconds ({elapsed:.0f} s)."
                )
            # A cold start takes about 8 s; move the bar along that curve, never past 85.
            percent = min(85, 15 + int(70 * elapsed / 10))
            if percent >= last_percent + 5:
                last_percent = percent
                yield Progress(percent, "Starting the agent gateway")
            time.sleep(0.05)

    def _wait_ready(self, spec: SandboxSpec, state: dict[str, Any]) -> None:
        timeout = float(spec.extra.get("ready_timeout", self.ready_timeout))
        path = str(spec.extra.get("ready_path", "/readyz"))
        url = f"http://127.0.0.1:{state['host_port']}{path}"
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
                    last_error = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                last_error = f"HTTP {exc.code}"
            except (OSError, urllib.error.URLError) as exc:
                last_error = str(exc)
            if not self.poll(spec, state).running:
                raise BackendError(
                    f"Sandbox {spec.name} exited before it was ready ({self._exit_text(state)})."
                )
            time.sleep(0.1)
        raise BackendError(
            f"Sandbox {spec.name}'s gateway was not ready within {timeout:.0f} s "
            f"({path}: {last_error})."
        )

    # -- stop / poll --------------------------------------------------------------------------

    def stop(self, spec: SandboxSpec, state: dict[str, Any], timeout: float = 10.0) -> None:
        main = _live(state.get("main"))
        if main:
            with contextlib.suppress(ProcessLookupError):
                os.kill(main, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _live(state.get("main")) and time.monotonic() < deadline:
                time.sleep(0.1)
        self._teardown(spec, state)

    def _teardown(self, spec: SandboxSpec, state: dict[str, Any]) -> None:
        """Kill everything the sandbox runs and remove its cgroups. Safe on partial state."""
        paths = state.get("cgroups") or self._cgroup_paths(spec)
        cgroups.kill_all(paths)
        pasta = _live(state.get("pasta"))  # only outside the cgroup if it never joined
        if pasta:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pasta, signal.SIGKILL)
        cgroups.remove(paths)
        # The supervisor notices its child is gone and records the exit code; give it a moment.
        deadline = time.monotonic() + 2
        while _live(state.get("supervisor")) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _cgroup_paths(self, spec: SandboxSpec) -> cgroups.CgroupPaths:
        """Where ``start`` would have put this sandbox's cgroups (for cleanup without state)."""
        return self._cgroup_paths_named(spec.name)

    def _cgroup_paths_named(self, name: str) -> cgroups.CgroupPaths:
        parents = self._cgroup_parents()
        return {ctrl: str(Path(parent) / name) for ctrl, parent in parents.items()}

    def _cgroup_parents(self) -> cgroups.CgroupPaths:
        """This backend's parent cgroup(s), under which each sandbox has its own."""
        root = self.cgroup_root
        if (root / "cgroup.controllers").exists():
            return {"unified": str(root / self.cgroup_parent)}
        return {
            ctrl: str(root / ctrl / self.cgroup_parent)
            for ctrl in cgroups.V1_CONTROLLERS
            if (root / ctrl).is_dir()
        }

    # -- what this machine holds ----------------------------------------------------------

    def volumes_here(self) -> set[int]:
        return volumes.present(self.volume_root, volumes.this_host())

    def running_here(self) -> set[int]:
        """Sandboxes with a cgroup under this backend's parent (running, frozen, or left by a
        crash)."""
        found: set[int] = set()
        for parent in self._cgroup_parents().values():
            try:
                entries = list(os.scandir(parent))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                sandbox_id = sandbox_id_of(entry.name)
                if sandbox_id is not None and entry.is_dir(follow_symlinks=False):
                    found.add(sandbox_id)
        return found

    def evict(self, sandbox_id: int) -> None:
        """Thaw, kill and remove the sandbox's cgroups, found by name (its state may be a
        new host's). Its pasta joins the cgroup at start, so it goes with them."""
        paths = self._cgroup_paths_named(sandbox_name(sandbox_id))
        if not any(Path(path).is_dir() for path in paths.values()):
            return
        with contextlib.suppress(OSError):
            cgroups.thaw(paths)
        cgroups.kill_all(paths)
        cgroups.remove(paths)

    def poll(self, spec: SandboxSpec, state: dict[str, Any]) -> PollResult:
        if not state:
            return PollResult(running=False, detail="never started")
        paths = state.get("cgroups", {})
        kills = cgroups.oom_kills(paths) if paths else 0
        oom_note = f"; {kills} process(es) killed for exceeding the memory limit" if kills else ""
        code = self._exit_code(state)
        if code is None and _live(state.get("main")):
            return PollResult(running=True, oom_killed=kills > 0, detail=f"running{oom_note}")
        # The gateway is gone; its supervisor records the exit code a moment later.
        deadline = time.monotonic() + 2
        while code is None and _live(state.get("supervisor")) and time.monotonic() < deadline:
            time.sleep(0.02)
            code = self._exit_code(state)
        return PollResult(
            running=False,
            exit_code=code,
            oom_killed=kills > 0,
            detail=f"{self._exit_text(state)}{oom_note}",
        )

    def _exit_code(self, state: dict[str, Any]) -> int | None:
        try:
            text = (Path(state["run_dir"]) / EXIT_NAME).read_text().strip()
        except (OSError, KeyError):
            return None
        return int(text) if text.lstrip("-").isdigit() else None

    def _exit_text(self, state: dict[str, Any]) -> str:
        code = self._exit_code(state)
        if code is None:
            return "exited, status unknown"
        if code > 128:
            return f"killed by signal {code - 128} ({signal.Signals(code - 128).name})"
        return f"exit code {code}"

    @contextlib.contextmanager
    def frozen(self, spec: SandboxSpec, state: dict[str, Any]) -> Iterator[None]:
        """Freeze the sandbox's cgroup (pasta, bwrap, the gateway, everything it started) for
        the block; thaw it after, whatever happens. A sandbox not running is left alone, and
        one frozen already (dozing) stays frozen after the block."""
        paths = state.get("cgroups")
        if not paths or not self.poll(spec, state).running or cgroups.is_frozen(paths):
            yield
            return
        try:
            cgroups.freeze(paths)
        except cgroups.CgroupError as exc:
            raise BackendError(f"Could not pause sandbox {spec.name}: {exc}") from exc
        try:
            yield
        finally:
            try:
                cgroups.thaw(paths)
            except cgroups.CgroupError as exc:
                raise BackendError(
                    f"Sandbox {spec.name} stays paused: {exc}. Thaw it by hand, or stop it."
                ) from exc

    def thaw(self, spec: SandboxSpec, state: dict[str, Any]) -> None:
        paths = state.get("cgroups")
        if not paths:
            return
        try:
            cgroups.thaw(paths)
        except cgroups.CgroupError as exc:
            raise BackendError(f"Could not resume sandbox {spec.name}: {exc}") from exc

    def freeze(self, spec: SandboxSpec, state: dict[str, Any]) -> None:
        """Freeze the sandbox's cgroup (everything in it) until :meth:`thaw`; idempotent."""
        paths = state.get("cgroups")
        if not paths or not self.poll(spec, state).running:
            raise BackendError(f"Sandbox {spec.name} is not running, so it cannot be paused.")
        try:
            cgroups.freeze(paths)
        except cgroups.CgroupError as exc:
            raise BackendError(f"Could not pause sandbox {spec.name}: {exc}") from exc

    # -- hibernation (CRIU) --------------------------------------------------------------------

    def checkpoint_support(self) -> str:
        if seccomp_program() is None:
            return (
                "Checkpoints need the sandbox's seccomp filter (x86_64 only) to keep Node off "
                "io_uring, which CRIU cannot save."
            )
        return criu.support(self.criu)

    def data_identity(self, spec: SandboxSpec) -> str:
        """Return "dev:ino" of the data dir and of its state/ subdir (links not followed)."""
        try:
            top = os.lstat(spec.data_dir)
        except OSError as exc:
            raise BackendError(f"The sandbox data directory {spec.data_dir}: {exc}") from exc
        try:
            sub = os.lstat(spec.data_dir / "state")
            inner = f"{sub.st_dev}:{sub.st_ino}"
        except OSError:
            inner = "-"
        return f"{top.st_dev}:{top.st_ino},{inner}"

    def checkpoint(self, spec: SandboxSpec, state: dict[str, Any]) -> CheckpointImage:
        """Dump the sandbox's pid namespace with CRIU into a new root-owned directory under
        ``checkpoint_dir``, then stop what is left (pasta) and remove the cgroups.

        A frozen (dozing) sandbox is thawed for the dump (CRIU stops it itself). On failure the
        image is removed, the sandbox keeps running (frozen again if it was) and BackendError
        says why."""
        reason = self.checkpoint_support()
        if reason:
            raise BackendError(reason)
        init = _live(state.get("init"))
        paths = state.get("cgroups")
        if not init or not paths or not self.poll(spec, state).running:
            raise BackendError(f"Sandbox {spec.name} is not running, so it cannot be saved.")
        run_dir = Path(state["run_dir"])
        identity = self.data_identity(spec)
        image_dir = self._new_image_dir(spec)
        was_frozen = cgroups.is_frozen(paths)
        try:
            self._refuse_deleted_files(init, paths)
            files = self._external_files(init, run_dir)
            net_inode = os.stat(f"/proc/{init}/ns/net").st_ino
            argv = criu.dump_argv(
                self.criu, init, image_dir, int(state["uid"]), net_inode, sorted(set(files))
            )
            if was_frozen:
                cgroups.thaw(paths)
            out = subprocess.run(argv, cwd=image_dir, capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise criu.CriuError(
                    f"criu dump failed ({criu.log_tail(image_dir, criu.DUMP_LOG)})"
                )
        except (criu.CriuError, OSError, subprocess.SubprocessError, cgroups.CgroupError) as exc:
            shutil.rmtree(image_dir, ignore_errors=True)
            if was_frozen and _live(state.get("init")):
                with contextlib.suppress(cgroups.CgroupError):
                    cgroups.freeze(paths)
            raise BackendError(f"Could not save sandbox {spec.name} to disk: {exc}") from exc
        # CRIU killed the tree; the supervisor stops pasta. Remove whatever is left.
        self._teardown(spec, state)
        meta = {
            "name": spec.name,
            "sandbox_id": spec.sandbox_id,
            "uid": int(state["uid"]),
            "host_port": int(state["host_port"]),
            "identity": identity,
            "log_key": sorted(set(files))[0] if files else "",
            "created_at": datetime.now(UTC).isoformat(),
        }
        criu.write_meta(image_dir, meta)
        # Root's and private: the page images hold the gateway's secrets (its token).
        for dirpath, dirnames, filenames in os.walk(image_dir):
            for name in [*dirnames, *filenames]:
                path = os.path.join(dirpath, name)
                os.lchown(path, 0, 0)
                mode = os.lstat(path).st_mode
                if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                    os.chmod(path, 0o700 if stat.S_ISDIR(mode) else 0o600)
        return CheckpointImage(str(image_dir), criu.image_size(image_dir), identity)

    def _new_image_dir(self, spec: SandboxSpec) -> Path:
        """Make a fresh root-owned 0700 directory for one image (never inside the data dir)."""
        top = self.checkpoint_dir
        if top.resolve().is_relative_to(spec.data_dir.resolve()):
            raise BackendError(f"The checkpoint directory {top} is inside the sandbox's data.")
        top.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(top, 0, 0)
        os.chmod(top, 0o700)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        image_dir = Path(tempfile.mkdtemp(prefix=f"{spec.name}-{stamp}-", dir=top))
        os.chmod(image_dir, 0o700)
        return image_dir

    def _refuse_deleted_files(self, init: int, paths: cgroups.CgroupPaths) -> None:
        """Refuse (CriuError) to save a sandbox any of whose processes holds a deleted file or
        directory (open, mapped, or as its cwd or root). CRIU would save such a file as a
        "ghost" and a restore, as root, would recreate it at its old path, which the sandbox
        may have turned into a link to a host directory since. Only links are read (never
        opened); CRIU's own in-memory files (memfd, SysV shared memory) are fine."""
        pid_ns = os.stat(f"/proc/{init}/ns/pid").st_ino
        for pid in sorted({init, *_descendants(init), *cgroups.pids(paths)}):
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/ns/pid").st_ino != pid_ns:
                    continue
                targets = [os.readlink(f"/proc/{pid}/{link}") for link in ("cwd", "root")]
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
                with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
                    for line in maps:  # "address perms offset dev inode   path"
                        fields = line.rstrip("\n").split(None, 5)
                        targets += fields[5:]
                for target in targets:
                    if target.endswith(" (deleted)") and not _in_memory_file(target):
                        raise criu.CriuError(
                            f"process {pid} holds deleted files; it will be stopped instead"
                        )

    def _external_files(self, init: int, run_dir: Path) -> list[str]:
        """Return CRIU keys of the files the sandbox's processes hold open from outside its
        mount namespace: only its log may be among them (stdout/stderr); anything else is
        refused, as CRIU could not reopen it."""
        mounts = set()
        for line in Path(f"/proc/{init}/mountinfo").read_text().splitlines():
            mounts.add(int(line.split()[0]))
        log = os.stat(run_dir / LOG_NAME)
        pid_ns = os.stat(f"/proc/{init}/ns/pid").st_ino
        keys = []
        for pid in [init, *_descendants(init)]:
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/ns/pid").st_ino != pid_ns:
                    continue
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if not target.startswith("/"):
                        continue  # pipes, sockets, anonymous inodes: CRIU saves those
                    fdinfo = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                    mnt_id = int(fdinfo.split("mnt_id:")[1].split()[0])
                    if mnt_id in mounts:
                        continue
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    if (st.st_dev, st.st_ino) != (log.st_dev, log.st_ino):
                        raise criu.CriuError(
                            f"process {pid} holds {target} open from outside the sandbox"
                        )
                    keys.append(criu.external_file_key(pid, int(fd)))
        return keys

    def restore(self, spec: SandboxSpec, image: CheckpointImage) -> Iterator[Progress]:
        """Restore a checkpoint: fresh cgroups and pasta (same host port when free), then
        `criu restore` into pasta's network namespace; wait for the port and ``/readyz``.

        Refuses an image that is missing, corrupt, of another sandbox or of another data dir;
        on any failure kills whatever it started and removes the cgroups (BackendError)."""
        yield Progress(2, "Checking the saved sandbox")
        reason = self.checkpoint_support()
        if reason:
            raise BackendError(reason)
        image_dir = Path(image.location)
        meta = self._check_image(spec, image, image_dir)
        self._check_tools(spec)
        uid = self.uid_base + spec.sandbox_id
        run_dir = self.run_root / spec.name
        for needed in (run_dir / "etc", run_dir / FILES_NAME):
            if not needed.is_dir():
                raise BackendError(f"Cannot restore sandbox {spec.name}: {needed} is gone.")
        state: dict[str, Any] = {}
        try:
            yield Progress(5, "Applying memory, CPU and process limits")
            paths = self._fresh_cgroups(spec)
            state = {"cgroups": paths}
            (run_dir / EXIT_NAME).unlink(missing_ok=True)
            root = self._fresh_root(spec, run_dir, image_dir.name)
            pidfile = run_dir / RESTORED_PID_NAME
            log_key = str(meta.get("log_key") or "")
            argv = criu.restore_argv(
                self.criu, image_dir, root, pidfile, 5, {log_key: 6} if log_key else {}
            )
            yield Progress(10, "Reading the sandbox's memory back from disk")
            port = int(meta["host_port"])
            state = self._launch(
                spec,
                run_dir,
                uid,
                paths,
                host_port=port if _port_free(port) else None,
                restore=argv,
            )
            yield Progress(70, "Sandbox restored, waiting for its gateway", state=dict(state))
            yield from self._wait_listening(spec, state)
            yield Progress(90, "Gateway is listening, waiting until it is ready")
            self._wait_ready(spec, state)
        except BaseException as exc:
            self._teardown(spec, state)
            if isinstance(exc, BackendError):
                detail = criu.log_tail(image_dir, criu.RESTORE_LOG)
                raise BackendError(
                    f"Could not restore sandbox {spec.name}: {exc} ({detail})"
                ) from None
            if isinstance(exc, cgroups.CgroupError | OSError | subprocess.SubprocessError):
                raise BackendError(f"Could not restore sandbox {spec.name}: {exc}") from exc
            raise
        yield Progress(100, "Sandbox is running", state=dict(state))

    def _fresh_root(self, spec: SandboxSpec, run_dir: Path, name: str) -> Path:
        """Remove the skeleton roots of earlier restores (nothing runs on them any more: the
        cgroups were emptied) and build a new one for this restore."""
        roots = run_dir / ROOTS_NAME
        shutil.rmtree(roots, ignore_errors=True)
        roots.mkdir(mode=0o755)
        root = roots / name
        criu.build_root(self.bwrap_args(spec, run_dir), root)
        return root

    def _check_image(
        self, spec: SandboxSpec, image: CheckpointImage, image_dir: Path
    ) -> dict[str, Any]:
        """Return the image's notes if it may be restored for ``spec``; else BackendError."""
        if not self._owns_image(image_dir):
            raise BackendError(f"{image_dir} is not a checkpoint of this machine's sandboxes.")
        if not image_dir.is_dir():
            raise BackendError(f"The checkpoint {image_dir} is missing.")
        try:
            meta = criu.read_meta(image_dir)
        except criu.CriuError as exc:
            raise BackendError(f"Cannot restore sandbox {spec.name}: {exc}") from exc
        for name in ("inventory.img", "pstree.img"):
            if not (image_dir / name).exists():
                raise BackendError(f"The checkpoint {image_dir} is incomplete ({name} missing).")
        if meta.get("name") != spec.name or meta.get("uid") != self.uid_base + spec.sandbox_id:
            raise BackendError(f"The checkpoint {image_dir} belongs to another sandbox.")
        current = self.data_identity(spec)
        if image.identity != current or meta.get("identity") != current:
            raise BackendError(
                f"The checkpoint {image_dir} was taken of another copy of {spec.data_dir} "
                f"(restored from a backup since?), so it cannot be restored onto this one."
            )
        if not isinstance(meta.get("host_port"), int):
            raise BackendError(f"The checkpoint {image_dir} is corrupt (no host port).")
        return meta

    def _owns_image(self, image_dir: Path) -> bool:
        """Whether ``image_dir`` is directly under ``checkpoint_dir`` (no other path is ours)."""
        return image_dir.parent.resolve() == self.checkpoint_dir.resolve() and (
            image_dir.name not in ("", ".", "..")
        )

    def list_checkpoints(self) -> list[tuple[str, str, datetime]]:
        """Every image directory under ``checkpoint_dir`` (named ``<sandbox>-<time>-<random>``,
        see ``_new_image_dir``), with when it was made."""
        found = []
        try:
            entries = list(os.scandir(self.checkpoint_dir))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            named = IMAGE_NAME.match(entry.name)
            name = named.group(1) if named else ""
            taken = datetime.fromtimestamp(entry.stat(follow_symlinks=False).st_mtime, UTC)
            found.append((entry.path, name, taken))
        return found

    def drop_checkpoint(self, location: str) -> None:
        image_dir = Path(location)
        if not self._owns_image(image_dir):
            raise BackendError(f"{location} is not a checkpoint of this machine's sandboxes.")
        if image_dir.is_symlink():
            image_dir.unlink()
            return
        shutil.rmtree(image_dir, ignore_errors=True)
        if image_dir.exists():
            raise BackendError(f"Could not remove the checkpoint {location}.")

    def endpoint(self, spec: SandboxSpec, state: dict[str, Any]) -> tuple[str, int]:
        if "host_port" not in state:
            raise BackendError(f"Sandbox {spec.name} has no endpoint: it was never started.")
        return ("127.0.0.1", int(state["host_port"]))

    # -- inspection ----------------------------------------------------------------------------

    def exec(
        self, spec: SandboxSpec, state: dict[str, Any], argv: list[str], timeout: float = 30.0
    ) -> ExecResult:
        init = _live(state.get("init"))
        if not init or not self.poll(spec, state).running:
            raise BackendError(f"Sandbox {spec.name} is not running, so nothing can run in it.")
        nsenter = [
            shutil.which("nsenter") or "/usr/bin/nsenter",
            f"--target={init}",
            "--mount",
            "--pid",
            "--net",
            "--ipc",
            "--uts",
            "--cgroup",
            "--time",  # a restored sandbox has its own (CRIU keeps its clocks going on)
            "--root",
            "--wd",
            "--",
            # A session of its own inside the pid namespace (CRIU cannot save a process whose
            # session leader is outside it), then the sandbox uid with no capabilities at all,
            # as the gateway (init_args).
            "/usr/bin/setsid",
            "/usr/bin/setpriv",
            f"--reuid={state['uid']}",
            f"--regid={state['uid']}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            *argv,
        ]
        env = self.sandbox_env(spec)
        env["HERMIT_CGROUP_PROCS"] = " ".join(cgroups.procs_files(state["cgroups"]))
        argv = ["/bin/sh", "-c", _JOIN, "hermit-exec", *nsenter]
        seccomp = Path(state["run_dir"]) / SECCOMP_NAME
        if seccomp_program():
            argv = under_filter(seccomp, argv)
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            # The command leads its own session inside the sandbox: kill that session's
            # processes (found from the wrappers and whatever holds the output pipes, as the
            # leader may be gone), then the wrappers outside (their own process group).
            pipes = [os.fstat(f.fileno()).st_ino for f in (proc.stdout, proc.stderr) if f]
            _kill_sessions(
                [*_descendants(proc.pid), *_holding_pipes(state["cgroups"], pipes)],
                state["cgroups"],
                keep={_session(int(state["init"][0])), _session(int(state["main"][0]))},
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
        return ExecResult(
            exit_code=proc.returncode,
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            timed_out=timed_out,
        )

    def processes(self, spec: SandboxSpec, state: dict[str, Any]) -> list[ProcessInfo]:
        """List host pids in the sandbox's cgroup; pasta and bwrap are named, not spelled out."""
        result = []
        for pid in cgroups.pids(state.get("cgroups", {})):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited while we looked
            program = os.path.basename(argv[0].decode(errors="replace"))
            if not program:  # an exited child not yet reaped has no command line: ps's [name]
                try:
                    command = f"[{Path(f'/proc/{pid}/comm').read_text().strip()}]"
                except OSError:
                    continue
            elif program in ("pasta", "bwrap"):
                command = f"{program} (sandbox {'network' if program == 'pasta' else 'setup'})"
            else:
                command = b" ".join(argv).decode(errors="replace").strip()
            result.append(ProcessInfo(pid=pid, command=command, rss_bytes=resident * PAGE_SIZE))
        return result

    def logs(self, spec: SandboxSpec, state: dict[str, Any], lines: int = 100) -> str:
        run_dir = Path(state.get("run_dir") or self.run_root / spec.name)
        return _tail(run_dir / LOG_NAME, lines)

    def _log_tail(self, run_dir: Path, lines: int = 20) -> str:
        tail = _tail(run_dir / LOG_NAME, lines).strip()
        return f"\nLast log lines:\n{tail}" if tail else "\n(The sandbox wrote no log output.)"

    def stats(self, spec: SandboxSpec, state: dict[str, Any], *, disk: bool = True) -> Stats:
        paths = state.get("cgroups", {})
        memory, limit = cgroups.memory_usage(paths) if paths else (0, 0)
        return Stats(
            memory_bytes=memory,
            memory_limit_bytes=limit,
            cpu_seconds=cgroups.cpu_seconds(paths) if paths else 0.0,
            disk_bytes=safefs.disk_usage(spec.data_dir) if disk else 0,
            oom_kills=cgroups.oom_kills(paths) if paths else 0,
        )


# -- small helpers ---------------------------------------------------------------------------


def _open_log(run_dir: Path, max_bytes: int) -> None:
    """Make the run dir's gateway.log root's, 0600, moving it to gateway.log.1 (one old copy)
    first if it is over ``max_bytes``. The supervisor appends to it as root. The run dir is
    root's, but links are refused all the same (O_NOFOLLOW)."""
    log = run_dir / LOG_NAME
    with contextlib.suppress(FileNotFoundError):
        if log.lstat().st_size > max_bytes:
            log.replace(run_dir / f"{LOG_NAME}.1")
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _kill_sessions(pids: list[int], paths: cgroups.CgroupPaths, keep: set[int | None]) -> None:
    """SIGKILL every process of the cgroup in the session of any of ``pids`` (host pids),
    except the sessions in ``keep`` (the gateway's)."""
    sessions = {_session(pid) for pid in pids} - keep - {None}
    for pid in cgroups.pids(paths):
        if _session(pid) in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _holding_pipes(paths: cgroups.CgroupPaths, inodes: list[int]) -> list[int]:
    """Return the pids of the cgroup that hold one of the pipes ``inodes`` open."""
    wanted = {f"pipe:[{inode}]" for inode in inodes}
    found = []
    for pid in cgroups.pids(paths):
        with contextlib.suppress(OSError):
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(_readlink(f"/proc/{pid}/fd/{fd}") in wanted for fd in fds):
                found.append(pid)
    return found


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _session(pid: int) -> int | None:
    """Return the host pid of the session (its leader's pid) of ``pid``; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[3])


def _in_memory_file(target: str) -> bool:
    """Whether a /proc link or maps line names a file that lives in memory only (memfd, SysV
    shared memory): CRIU saves those itself, with no file on disk."""
    return target.startswith(("/memfd:", "/SYSV"))


def _resolve(program: str) -> str:
    """Return the absolute path of ``program`` (a path or a name on PATH), or it unchanged."""
    if os.sep in program:
        return program
    return shutil.which(program) or program


def _host_addresses() -> list[str]:
    """Return the host's own global addresses as /32 and /128 networks."""
    out = subprocess.run(
        [_resolve("ip"), "-json", "address", "show"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    found = []
    for link in json.loads(out.stdout):
        for info in link.get("addr_info", []):
            if info.get("scope") in ("global", "site"):
                found.append(f"{info['local']}/{128 if ':' in info['local'] else 32}")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_time(pid: int) -> int:
    """Return the process's start time (clock ticks since boot): with the pid, a unique id."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[19])


def _live(ident: Any) -> int | None:
    """Return the pid if ``ident`` ([pid, start_time]) names a live, non-zombie process."""
    if not ident:
        return None
    pid, started = int(ident[0]), int(ident[1])
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X") or int(fields[19]) != started:
        return None
    return pid


def _ns_pid(pid: int) -> int | None:
    """Return the pid of ``pid`` as seen inside its innermost pid namespace."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        pass
    return None


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _port_free(port: int) -> bool:
    """Whether TCP ``port`` on the host's loopback can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pasta binds it
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _listening(pid: int, port: int) -> bool:
    """Whether anything listens on TCP ``port`` in the network namespace of ``pid``."""
    want = f":{port:04X}"
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[1].endswith(want) and fields[3] == "0A":
                return True
    return False


def _file_key(spec: SandboxSpec, inside: str) -> str:
    """Return the run-dir file name for the read-only file at ``inside``; refuse odd paths."""
    path = Path(inside)
    if (
        not path.is_absolute()
        or ".." in path.parts
        or str(path) != inside
        or len(path.parts) < 3
        or path.is_relative_to(spec.data_dir)
        or path.parts[1] in ("proc", "dev", "tmp")
    ):
        raise BackendError(f"Cannot place a read-only file at {inside!r} in a sandbox.")
    return inside.strip("/").replace("/", "__")


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            data = handle.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
