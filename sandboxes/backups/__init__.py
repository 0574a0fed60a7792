"""Backups of sandboxes: restic repositories (``restic``), where they live (``storage``).

``EXCLUDES`` are the paths, relative to a sandbox's data dir, that OpenClaw rebuilds by itself
(caches, temporary files, logs; see RUNTIME.md), so no backup stores them and no change in them
counts as a change of the sandbox.
"""

from __future__ import annotations

EXCLUDES: tuple[str, ...] = (
    "cache",
    "tmp",
    "logs",
    "home/.cache",
    "home/.npm",
    "state/cache",
    "state/tmp",
)
