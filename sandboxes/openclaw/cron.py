"""Read an agent's own schedule through its gateway, before the sandbox sleeps.

OpenClaw runs cron jobs ("automations") inside the gateway process: a frozen or stopped gateway
fires nothing. So just before a sandbox dozes or sleeps, the portal asks the gateway when its
next job is due and stores that time (``Sandbox.next_job_at``); beat wakes the sandbox shortly
before it (:mod:`sandboxes.schedule`).

The gateway RPC is ``cron.status`` (scope ``operator.read``): its ``nextWakeAtMs`` is the
scheduler's own next timer, the earliest ``state.nextRunAtMs`` over the enabled, time-scheduled
jobs (``at``, ``every``, ``cron``), or null when there is none or cron is disabled. Event-driven
jobs (stream, on-exit, condition watchers) have no due time and need the gateway running anyway.
Heartbeats are not counted: Hermit's config turns them off (``agents.defaults.heartbeat.every``
is ``"0m"``, see :mod:`sandboxes.openclaw.config`).

``cron.list`` (compact, also ``operator.read``) tells whether a job is running now
(``runningAtMs``), so the idle policy does not put a sandbox to sleep in the middle of one.

Every call here is synchronous and bounded by a short timeout (HERMIT_CRON_READ_TIMEOUT,
default 5 s): it connects to the gateway with the sandbox's own device key and token (the same
identity the webchat uses), asks, and closes. :func:`next_job_at` and :func:`busy` never raise:
a gateway that cannot be asked is logged and treated as having nothing scheduled or running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from django.conf import settings

from sandboxes.openclaw.protocol import ClientInfo, GatewayConnection, GatewayError

if TYPE_CHECKING:
    from sandboxes.models import Sandbox

log = logging.getLogger(__name__)

READ_SCOPES = ("operator.read",)
DEFAULT_TIMEOUT = 5.0
LIST_PAGE = 200  # jobs per cron.list page; an agent with more is read page by page
MAX_PAGES = 10

T = TypeVar("T")


class CronUnavailable(Exception):
    """The gateway could not be asked about its schedule (down, refused, slow, nonsense)."""


@dataclass(frozen=True)
class CronStatus:
    """What the gateway's scheduler says: its next due time, and the jobs running now."""

    enabled: bool
    next_wake_at: datetime | None
    running: tuple[str, ...] = ()


def read_timeout() -> float:
    return float(getattr(settings, "HERMIT_CRON_READ_TIMEOUT", DEFAULT_TIMEOUT))


def from_ms(value: Any) -> datetime | None:
    """Return the aware UTC datetime of a millisecond epoch timestamp, or None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    try:
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def next_job_at(sandbox: Sandbox, *, timeout: float | None = None) -> datetime | None:
    """Return when the agent's next own scheduled job is due, or None.

    None when it has none, and also when the gateway cannot be asked in ``timeout`` seconds
    (the reason is logged): never raises. A due time already past (a job due but not started
    yet) is returned as it is: the sandbox should not sleep through it.
    """
    try:
        status = read_status(sandbox, timeout=timeout)
    except CronUnavailable as exc:
        log.warning("sandbox %s: could not read its next scheduled job: %s", sandbox.pk, exc)
        return None
    return status.next_wake_at


def busy(sandbox: Sandbox, *, timeout: float | None = None) -> bool:
    """Return True if one of the agent's jobs is running (or queued to run) now.

    False when none is, and when the gateway cannot be asked (logged): never raises.
    """
    try:
        status = read_status(sandbox, timeout=timeout, with_running=True)
    except CronUnavailable as exc:
        log.warning("sandbox %s: could not read its running jobs: %s", sandbox.pk, exc)
        return False
    return bool(status.running)


def read_status(
    sandbox: Sandbox, *, timeout: float | None = None, with_running: bool = False
) -> CronStatus:
    """Ask the sandbox's gateway for its scheduler status; raise CronUnavailable if it can't.

    ``with_running`` also lists the jobs to find those running now (one more request).
    """
    limit = read_timeout() if timeout is None else timeout
    try:
        url, token, identity = _connect_args(sandbox)
    except Exception as exc:  # no endpoint (not running), no token or key: nothing to ask
        raise CronUnavailable(_describe(exc)) from exc

    async def ask(conn: GatewayConnection) -> CronStatus:
        status = await conn.request("cron.status", {}, timeout=limit)
        enabled = bool(status.get("enabled", True))
        running = await _running_jobs(conn, limit) if with_running and enabled else ()
        return CronStatus(enabled, from_ms(status.get("nextWakeAtMs")), running)

    async def session() -> CronStatus:
        conn = await GatewayConnection.open(
            url,
            token=token,
            identity=identity,
            info=ClientInfo(scopes=READ_SCOPES),
            timeout=limit,
        )
        try:
            return await ask(conn)
        finally:
            await conn.close()

    try:
        return run_bounded(session, limit)
    except (GatewayError, OSError, TimeoutError) as exc:
        raise CronUnavailable(_describe(exc)) from exc


async def _running_jobs(conn: GatewayConnection, timeout: float) -> tuple[str, ...]:
    running: list[str] = []
    for page in range(MAX_PAGES):
        payload = await conn.request(
            "cron.list",
            {"compact": True, "limit": LIST_PAGE, "offset": page * LIST_PAGE},
            timeout=timeout,
        )
        jobs = payload.get("jobs")
        if not isinstance(jobs, list):
            raise GatewayError("PROTOCOL", "cron.list answered without a job list")
        running += [
            str(job.get("id"))
            for job in jobs
            if isinstance(job, dict) and from_ms(job.get("runningAtMs")) is not None
        ]
        if len(jobs) < LIST_PAGE or not payload.get("hasMore", True):
            break
    return tuple(running)


def _connect_args(sandbox: Sandbox) -> tuple[str, str, Any]:
    """The gateway URL, token and device key the portal connects with (as the webchat does)."""
    from sandboxes import actions
    from sandboxes.consumers.chat import device_identity_for

    if not sandbox.gateway_token:
        raise CronUnavailable("the sandbox has no gateway token")
    host, port = actions.gateway_endpoint(sandbox)
    return f"ws://{host}:{port}", sandbox.gateway_token, device_identity_for(sandbox)


def run_bounded(make: Callable[[], Awaitable[T]], timeout: float) -> T:
    """Run the coroutine ``make()`` to completion within ``timeout`` seconds, from sync code.

    In its own event loop; in a helper thread if this thread already runs one (an async caller
    that forgot ``sync_to_async``), so it never blocks or breaks that loop's state.
    Raise TimeoutError when the time is up.
    """

    async def bounded() -> T:
        return await asyncio.wait_for(make(), timeout)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(bounded())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, bounded()).result()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "the gateway did not answer in time"
    if isinstance(exc, GatewayError):
        return exc.message if exc.code in ("UNAVAILABLE", "DISCONNECTED") else str(exc)
    return str(exc) or exc.__class__.__name__
