"""Root-side work on a directory that a sandbox controls, without ever following its links.

Contract: a sandbox may plant anything in its data dir (symlinks, relative ``..`` links, dangling
links, FIFOs, hard links to its own files) and may swap entries while root works on them. Every
function here starts from a directory fd opened with ``O_NOFOLLOW | O_DIRECTORY``, names one
path component at a time relative to such an fd, opens only directories (never a file, so a
FIFO or device cannot block or trigger anything), and changes entries with the ``*at`` calls
and ``AT_SYMLINK_NOFOLLOW``. So root never reads, writes, creates, chowns or counts anything
outside the tree it was given. The root path itself must be a directory the sandbox cannot
replace (its parent is root's).

Limits: trees deeper than ``MAX_DEPTH`` are not descended (one fd is held per level); what lies
below is the sandbox's own making, so its uid already owns it, and ``disk_usage`` undercounts it.
Deleting a tree: :func:`remove_tree` (``shutil.rmtree`` recurses once per level, so a tree a few
thousand directories deep, which restic restores fine, makes it raise RecursionError).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

MAX_DEPTH = 200
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@contextlib.contextmanager
def opened_dir(path: Path | str, dir_fd: int | None = None) -> Iterator[int]:
    """Open a directory without following a link at its last component; close it after.

    Raises OSError (ELOOP or ENOTDIR) if ``path`` is a symlink or not a directory.
    """
    fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def make_subdirs(root: Path, names: Iterable[str], mode: int = 0o755) -> None:
    """Make sure each ``root/<name>`` (one component) is a real directory.

    A symlink in its place is removed (never followed) and the directory made; any other
    non-directory the sandbox put there is left alone.
    """
    with opened_dir(root) as fd:
        for name in names:
            if os.sep in name or name in ("", ".", ".."):
                raise ValueError(f"not a single path component: {name!r}")
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    os.unlink(name, dir_fd=fd)
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, mode, dir_fd=fd)


def walk(root: Path) -> Iterator[tuple[int, str, os.stat_result]]:
    """Yield ``(dir_fd, name, lstat)`` for every entry under ``root`` (not root itself).

    ``dir_fd`` is valid only until the next item. Directories are entered through
    ``O_NOFOLLOW`` fds, and only if the opened directory is the one that was listed.
    """
    with opened_dir(root) as fd:
        yield from _walk(fd, 1)


def _walk(fd: int, depth: int) -> Iterator[tuple[int, str, os.stat_result]]:
    try:
        names = os.listdir(fd)
    except OSError:  # gone since it was entered
        return
    for name in names:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:  # gone since the listing
            continue
        yield fd, name, st
        if stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue  # swapped for a link or a file since the lstat: not ours to enter
            try:
                now = os.fstat(child)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    yield from _walk(child, depth + 1)
            finally:
                os.close(child)


def chown_tree(root: Path, uid: int, gid: int, root_mode: int | None = None) -> None:
    """Give ``root`` and everything under it to ``uid:gid`` (links themselves, not targets).

    A non-directory with more than one hard link that someone else owns is left alone: it
    may be a host file linked in (a sandbox itself cannot, but a copied or restored tree
    could), and chowning it would hand the host file to the sandbox.
    """
    with opened_dir(root) as fd:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
        if root_mode is not None:
            os.fchmod(fd, root_mode)
        for dir_fd, name, st in _walk(fd, 1):
            if (st.st_uid, st.st_gid) == (uid, gid):
                continue
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and st.st_uid != uid:
                continue
            with contextlib.suppress(OSError):  # gone since the listing
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def disk_usage(root: Path) -> int:
    """Return the bytes allocated to files under ``root``, each inode counted once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    with contextlib.suppress(OSError):
        for _fd, _name, st in walk(root):
            if not stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def fingerprint(root: Path, excludes: Iterable[str] = ()) -> str:
    """Return a hex digest of the tree under ``root`` as it stands: every entry's relative
    path, type and mode, size, mtime and ctime (ns) and inode, in a stable order.

    Nothing is followed or opened but directories (``O_NOFOLLOW``). ``excludes`` are relative
    paths (exact, no patterns) whose entries, and everything below them, are left out. Equal
    digests mean restic would find nothing changed; any write, rename, chmod or replacement
    changes it.
    """
    skip = {name.strip("/") for name in excludes}
    digest = hashlib.sha256()
    with opened_dir(root) as fd:
        for rel, st in _walk_rel(fd, "", skip, 1):
            line = f"{rel}\0{st.st_mode:o}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
            digest.update(f"{line}\0{st.st_ino}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


def _walk_rel(
    fd: int, prefix: str, skip: set[str], depth: int
) -> Iterator[tuple[str, os.stat_result]]:
    """Yield ``(relative path, lstat)`` under the directory ``fd``, names sorted."""
    try:
        names = sorted(os.listdir(fd))
    except OSError:
        return
    for name in names:
        rel = f"{prefix}{name}"
        if rel in skip:
            continue
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            continue
        yield rel, st
        if stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue
            try:
                now = os.fstat(child)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    yield from _walk_rel(child, f"{rel}/", skip, depth + 1)
            finally:
                os.close(child)


RM = "/bin/rm"


def remove_tree(path: Path | str) -> None:
    """Delete ``path`` and everything under it, however deep, following no link.

    Runs GNU ``rm -rf --one-file-system``: it walks with fts relative to directory fds (depth
    costs no recursion), never follows a link (a link is removed, not its target; ``path``
    itself too), and crosses no mount. A missing ``path`` is no error. Raises OSError with
    rm's reason if anything is left.
    """
    result = subprocess.run(
        [RM, "-rf", "--one-file-system", "--", os.fspath(path)],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    )
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()
        raise OSError(f"Could not remove {path}: {reason[0] if reason else 'rm failed'}")
