"""The embedded default's cache: Django's file cache, shared by every process of the portal.

Without Redis the cache is a folder, used by the web processes (run as the unprivileged web
user by bin/run) and by the Celery worker (root). Django writes each entry through ``mkstemp``
(mode 0600), so an entry the worker writes would be unreadable to the web processes (a thaw's
or a wake's reply, the dozing hint). As SQLite does with its journal files, an entry written
as root is handed, through its open descriptor, to the owner of the cache folder (the web
user: bin/web-user makes the folder its own). Entries are pickles, as in every Django cache:
whoever may write the folder (or Redis) is trusted by every process that reads it.
"""

from __future__ import annotations

import os
from typing import Any

from django.core.cache.backends.filebased import FileBasedCache


class SharedFileBasedCache(FileBasedCache):
    def _write_content(self, file: Any, timeout: Any, value: Any) -> None:
        if os.geteuid() == 0:
            folder = os.stat(self._dir)  # type: ignore[attr-defined]  # Django's, not stubbed
            if folder.st_uid != 0:
                os.fchown(file.fileno(), folder.st_uid, folder.st_gid)
        super()._write_content(file, timeout, value)  # type: ignore[misc]
