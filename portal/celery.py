"""The Celery application, configured from Django settings (CELERY_* names).

Workers and beat log through settings.LOGGING (the text or JSON format, secrets redacted)
rather than through the handlers Celery would put on the root logger.

A sandbox host's worker (HERMIT_HOST_WORKER, the default) also consumes its host's own queue
(sandboxes.hosts.queue_for) and heartbeats its SandboxHost row (:class:`HostHeartbeat`), so
``celery -A portal worker`` needs no extra flags. A sandbox's task that reaches a worker of
another host is sent on to its own host's queue (:class:`HostTask`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, bootsteps
from celery.contrib.django.task import DjangoTask
from celery.signals import celeryd_after_setup, setup_logging

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

log = logging.getLogger(__name__)


class HostTask(DjangoTask):
    """Every task's base: a sandbox's task that a worker of another host received (the sandbox
    moved after the task was queued) is sent on to its host's queue instead of run there.
    Direct calls and eager runs are never forwarded."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if not (request.called_directly or request.is_eager) and self._elsewhere(args, kwargs):
            self.apply_async(args, kwargs)
            return "forwarded"
        return super().__call__(*args, **kwargs)

    def _elsewhere(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        from sandboxes import hosts

        host = hosts.host_for_task(self, args, kwargs)
        return host is not None and host != hosts.local_name()


app = Celery("portal", task_cls=HostTask)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@setup_logging.connect
def _log_through_settings(**kwargs: Any) -> None:
    """Configure logging from settings.LOGGING (a receiver here stops Celery's own setup)."""
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)


def is_host_worker() -> bool:
    from django.conf import settings

    return bool(settings.HERMIT_HOST_WORKER)


@celeryd_after_setup.connect
def _consume_host_queue(sender: str, instance: Any, **kwargs: Any) -> None:
    """Add this host's queue to what the worker consumes (after ``-Q`` was applied), as
    Celery's documentation shows for this signal."""
    if not is_host_worker():
        return
    from sandboxes.hosts import local_name, queue_for

    queue = queue_for(local_name())
    instance.app.amqp.queues.select_add(queue)
    log.info("worker %s consumes the host queue %s", sender, queue)


class HostHeartbeat(bootsteps.StartStopStep):
    """Heartbeat this host's row from its worker, every HERMIT_HOST_HEARTBEAT_INTERVAL seconds.

    A worker bootstep on the worker's own timer, rather than a beat task routed to each host's
    queue: a beat task says only that beat and the broker work, its messages pile up in the
    queue of a host that is down (and a burst of stale ones would look like a live host when it
    comes back), and it needs a schedule entry per host. The timer runs in the worker process
    itself, so the heartbeat stops exactly when the worker does, and one more host needs no
    configuration. The first beat runs at start, which also registers a new host.
    """

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None

    def start(self, worker: Any) -> None:
        if not is_host_worker():
            return
        from django.conf import settings

        self.beat()
        interval = float(settings.HERMIT_HOST_HEARTBEAT_INTERVAL)
        self.tref = worker.timer.call_repeatedly(interval, self.beat, priority=10)

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def beat(self) -> None:
        """One heartbeat; a failure (the database is away) is logged, never raised into the
        worker's timer."""
        from django.db import close_old_connections

        from sandboxes.fencing import queue_fence
        from sandboxes.hosts import heartbeat
        from sandboxes.models import SandboxHost

        try:
            close_old_connections()
            host = heartbeat()
            if host.state == SandboxHost.State.LOST:  # back after it was lost: fence it
                queue_fence(host)
        except Exception:
            log.exception("host heartbeat failed")


app.steps["worker"].add(HostHeartbeat)
