"""What a sandbox's owner is allowed, as the sandboxes layer sees it: a value it receives.

Sandboxes never read plans. The app that owns plans (``billing``) registers a provider at
app-ready (:func:`register_provider`) that turns an owner into a :class:`SandboxLimits`; every
start, sleep and backup decision asks :func:`limits_for`. The arrow runs one way: billing
imports sandboxes, never the reverse. When an owner's limits change (a plan change), the owner
of the provider tells sandboxes so through :func:`limits_changed`, which queues the work that
applies them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, Protocol

from django.core.exceptions import ImproperlyConfigured
from django.db import transaction

log = logging.getLogger(__name__)


class Resources(Protocol):
    """The resource limits a sandbox is started with (a SandboxLimits has them)."""

    @property
    def memory_mb(self) -> int: ...

    @property
    def cpu_millis(self) -> int: ...

    @property
    def pids_max(self) -> int: ...

    @property
    def internet(self) -> bool: ...

    @property
    def browser(self) -> bool: ...


# What a gateway is started with: memory (MB), CPU (millicores), processes, internet, browser.
ResourceTuple = tuple[int, int, int, bool, bool]


@dataclass(frozen=True)
class SandboxLimits:
    """One owner's limits: what their sandboxes start with, how they sleep and are backed up.

    ``plan_name`` is for messages only ("Restarting your agent with the Pro plan").
    ``memory_mb`` is the sandbox's whole memory limit: with ``browser`` on it includes
    ``browser_memory_mb``, the share set aside for the agent's Chromium, which runs inside the
    sandbox and is charged to the same cgroup.
    """

    plan_name: str
    memory_mb: int
    cpu_millis: int  # 1000 = one full core
    pids_max: int
    internet: bool
    sleep_after: timedelta | None  # idle time before sleep; None = never sleeps
    backup_interval: timedelta | None  # None = no scheduled backups
    backup_keep_last: int = 0
    backup_keep_daily: int = 0
    backup_keep_weekly: int = 0
    browser: bool = False
    browser_memory_mb: int = 0

    def sleeps_after(self) -> timedelta | None:
        """Return the idle time after which a sandbox sleeps, or None if it never sleeps."""
        return self.sleep_after

    def resources(self) -> ResourceTuple:
        """What a gateway is started with and keeps until it stops: memory (MB), CPU
        (millicores), processes, internet, browser. Two owners with equal resources can run the same
        gateway; a change of any of them needs a restart to reach a running one."""
        return (self.memory_mb, self.cpu_millis, self.pids_max, self.internet, self.browser)


Provider = Callable[[Any], SandboxLimits]

_provider: Provider | None = None


def register_provider(provider: Provider) -> None:
    """Make ``provider`` (owner -> SandboxLimits) the source of every owner's limits."""
    global _provider
    _provider = provider


def limits_for(owner: Any) -> SandboxLimits:
    """Return the limits of ``owner`` (a user) from the registered provider."""
    if _provider is None:
        raise ImproperlyConfigured(
            "No provider of sandbox limits is registered: the app that owns plans must call "
            "sandboxes.limits.register_provider() in its AppConfig.ready()."
        )
    return _provider(owner)


def limits_changed(owner: Any) -> None:
    """Note that ``owner``'s limits changed: once the current transaction commits, each of
    their sandboxes is brought in line (``sandboxes.tasks.apply_plan``: restarted with new
    resources, woken on a plan that never sleeps, its checkpoint dropped)."""
    from sandboxes.tasks import apply_plan

    for sandbox_id in owner.sandboxes.values_list("pk", flat=True):
        transaction.on_commit(partial(_queue, apply_plan, sandbox_id))


def _queue(task: Any, *args: Any) -> None:
    try:
        task.delay(*args)
    except Exception:
        log.warning("could not queue %s", task.name)
