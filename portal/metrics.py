"""Prometheus metrics, read at scrape time from where every process already writes.

Contract: ``render()`` returns the exposition text of ``HermitCollector``; each scrape runs a
few indexed queries, one cache read and one broker call. Series (all gauges, or gauge
histograms):

- ``hermit_sandboxes{state, plan}``: sandboxes now, by state and their owner's plan (slug;
  ``none`` without an account). Every state is listed for every plan, zeros included.
- ``hermit_sandbox_start_seconds`` and ``hermit_sandbox_wake_seconds`` (gauge histograms) and
  ``hermit_sandbox_start_failures`` / ``hermit_sandbox_wake_failures``: the starts and wakes
  that ended in the last ``HERMIT_METRICS_WINDOW`` seconds, from the sandbox state events (a
  start runs from entering ``starting`` to ``running``; a wake is a start out of ``sleeping``,
  cold or from its checkpoint; a failure is ``starting`` followed by ``failed``). A thaw of a
  dozing agent takes milliseconds and leaves no start to time: it is not counted.
- ``hermit_backup_seconds`` (gauge histogram) and ``hermit_backup_failures``: backups that
  ended in the window, from the backup events (begun at "Backing up", ended at "Backed up
  snapshot"; a failure is a "Backup failed" or "Failed:" event).
- ``hermit_ai_calls{upstream, outcome}``, ``hermit_ai_tokens{upstream, kind}`` (input, output,
  cached) and ``hermit_ai_errors{upstream}``: model calls through the AI gateway in the
  window, from its usage records (upstream by name, ``none`` when the call was refused; every
  configured upstream is listed, zeros included).
- ``hermit_chat_sessions_open``: browser chat sessions open now (sandboxes.chat_sessions).
- ``hermit_celery_queue_depth{queue}``: messages waiting in the default Celery queue and in
  each registered sandbox host's own queue (Redis LLEN of its priority lists, or the folder
  broker's message files). A lost host's queue is where its sandboxes' tasks piled up.
- ``hermit_host_heartbeat_age_seconds{host, state}``, ``hermit_host_free_ram_bytes{host}`` and
  ``hermit_host_sandboxes_awake{host}``: each registered sandbox host as its worker last
  reported (an age of -1: it never did). Alert on the age passing HERMIT_HOST_LOST_AFTER, or on
  ``state="lost"``.

Why windows read from the database rather than counters kept in memory: starts, wakes and
backups run in Celery workers, model calls in the AI gateway's own process, and the web
process that answers the scrape sees none of them. The database already has a row for each
(the events, the usage records), written by whichever process did the work on whichever host,
surviving restarts; reading them needs no shared directory (prometheus multiprocess mode), no
extra write on a hot path and no change to the code that does the work. The price is their
semantics: they describe the last window, so they are gauges and gauge histograms (OpenMetrics'
own type for this), read as they are (``histogram_quantile(0.95,
hermit_sandbox_start_seconds_bucket)``, ``hermit_ai_calls / window``), never with ``rate()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db.models import Count, Sum
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = CONTENT_TYPE_LATEST
START_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
BACKUP_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# A start or backup that ended in the window may have begun before it: look back this much more.
LOOKBACK = timedelta(hours=1)
REDIS_PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: a priority's list is queue + sep + n
REDIS_PRIORITY_STEPS = (3, 6, 9)  # besides the plain list (priority 0)


@dataclass
class Durations:
    """Observed durations (seconds) and failures of one kind of work."""

    seconds: list[float] = field(default_factory=list)
    failures: int = 0

    def histogram(self, name: str, doc: str, buckets: Iterable[float]) -> Metric:
        family = GaugeHistogramMetricFamily(name, doc)
        counts = [
            (floatToGoString(bound), sum(1 for s in self.seconds if s <= bound))
            for bound in buckets
        ]
        counts.append(("+Inf", len(self.seconds)))
        family.add_metric([], counts, sum(self.seconds))
        return family


def sandbox_counts() -> Metric:
    from billing.models import Plan
    from sandboxes.models import Sandbox

    rows = Sandbox.objects.values_list("state", "owner__account__plan__slug").annotate(
        n=Count("id")
    )
    counts = {(state, plan or "none"): n for state, plan, n in rows}
    plans = {plan for _, plan in counts} | set(Plan.objects.values_list("slug", flat=True))
    states = {state for state, _ in Sandbox.State.choices} | {state for state, _ in counts}
    family = GaugeMetricFamily(
        "hermit_sandboxes", "Sandboxes by state and their owner's plan.", labels=["state", "plan"]
    )
    for state in sorted(states):
        for plan in sorted(plans):
            family.add_metric([state, plan], counts.get((state, plan), 0))
    return family


def start_durations(since: datetime) -> tuple[Durations, Durations]:
    """Return (starts, wakes) that ended at or after ``since``, from the state events."""
    from sandboxes.models import Sandbox, SandboxEvent

    state = Sandbox.State
    rows = (
        SandboxEvent.objects.filter(kind="state", created_at__gte=since - LOOKBACK)
        .order_by("sandbox_id", "created_at", "id")
        .values_list("sandbox_id", "state", "created_at")
    )
    starts, wakes = Durations(), Durations()
    current, previous = None, ""
    begun: tuple[datetime, Durations] | None = None
    for sandbox_id, new, at in rows.iterator():
        if sandbox_id != current:
            current, previous, begun = sandbox_id, "", None
        if new == state.STARTING:
            begun = (at, wakes if previous == state.SLEEPING else starts)
        elif begun is not None:
            began, kind = begun
            if at >= since and new == state.RUNNING:
                kind.seconds.append((at - began).total_seconds())
            elif at >= since and new == state.FAILED:
                kind.failures += 1
            begun = None
        previous = new
    return starts, wakes


def backup_durations(since: datetime) -> Durations:
    """Return the backups that ended at or after ``since``, from the backup events."""
    from sandboxes.models import SandboxEvent

    rows = (
        SandboxEvent.objects.filter(kind="backup", created_at__gte=since - LOOKBACK)
        .order_by("sandbox_id", "created_at", "id")
        .values_list("sandbox_id", "message", "created_at")
    )
    backups = Durations()
    began: dict[int, datetime] = {}
    for sandbox_id, message, at in rows.iterator():
        if message.startswith("Backing up"):
            began[sandbox_id] = at
        elif message.startswith("Backed up snapshot"):
            start = began.pop(sandbox_id, None)
            if start is not None and at >= since:
                backups.seconds.append((at - start).total_seconds())
        elif message.startswith(("Backup failed", "Failed:")):
            began.pop(sandbox_id, None)
            if at >= since:
                backups.failures += 1
    return backups


def ai_gateway(since: datetime) -> Iterator[Metric]:
    from ai_gateway.models import Upstream, UsageRecord

    rows = (
        UsageRecord.objects.filter(created_at__gte=since)
        .values_list("upstream__name", "outcome")
        .annotate(
            calls=Count("id"),
            input=Sum("input_tokens"),
            output=Sum("output_tokens"),
            cached=Sum("cached_tokens"),
        )
    )
    calls = GaugeMetricFamily(
        "hermit_ai_calls",
        "Model calls through the AI gateway in the window, by upstream and outcome.",
        labels=["upstream", "outcome"],
    )
    tokens = GaugeMetricFamily(
        "hermit_ai_tokens",
        "Tokens of model calls in the window, by upstream and kind (input, output, cached).",
        labels=["upstream", "kind"],
    )
    errors = GaugeMetricFamily(
        "hermit_ai_errors",
        "Model calls that failed in the window, by upstream.",
        labels=["upstream"],
    )
    # Every upstream is listed, zeros included, so a quiet one still shows on a dashboard.
    known = set(Upstream.objects.values_list("name", flat=True))
    call_counts = {(name, outcome): 0 for name in known for outcome in UsageRecord.Outcome.values}
    token_sums = {(name, kind): 0 for name in known for kind in ("input", "output", "cached")}
    error_sums = dict.fromkeys(known, 0)
    for name, outcome, n, inp, out, cached in rows:
        upstream = name or "none"
        call_counts[upstream, outcome] = n
        error_sums.setdefault(upstream, 0)
        for kind, value in (("input", inp), ("output", out), ("cached", cached)):
            token_sums[upstream, kind] = token_sums.get((upstream, kind), 0) + (value or 0)
        error_sums[upstream] += n if outcome == UsageRecord.Outcome.ERROR else 0
    for (upstream, outcome), value in sorted(call_counts.items()):
        calls.add_metric([upstream, outcome], value)
    for (upstream, kind), value in sorted(token_sums.items()):
        tokens.add_metric([upstream, kind], value)
    for upstream, value in sorted(error_sums.items()):
        errors.add_metric([upstream], value)
    yield from (calls, tokens, errors)


def queue_depth(host_names: Iterable[str]) -> Metric:
    from portal.celery import app
    from sandboxes.hosts import queue_for

    family = GaugeMetricFamily(
        "hermit_celery_queue_depth", "Messages waiting in the Celery queue.", labels=["queue"]
    )
    queues = [str(app.conf.task_default_queue), *(queue_for(name) for name in host_names)]
    depth = _redis_depth if settings.REDIS_URL else _folder_depth
    for queue in queues:
        family.add_metric([queue], depth(queue))
    return family


def sandbox_hosts(now: datetime) -> tuple[list[str], list[Metric]]:
    """The registered hosts' names, and their heartbeat age, free RAM and awake sandboxes."""
    from sandboxes.models import SandboxHost

    age = GaugeMetricFamily(
        "hermit_host_heartbeat_age_seconds",
        "Seconds since the host's worker last heartbeated (-1: never).",
        labels=["host", "state"],
    )
    free = GaugeMetricFamily(
        "hermit_host_free_ram_bytes", "The host's available RAM, as last reported.", labels=["host"]
    )
    awake = GaugeMetricFamily(
        "hermit_host_sandboxes_awake",
        "Sandboxes awake on the host, as last reported.",
        labels=["host"],
    )
    names = []
    for host in SandboxHost.objects.order_by("name"):
        names.append(host.name)
        seen = host.heartbeat_age(now)
        age.add_metric([host.name, host.state], -1 if seen is None else seen.total_seconds())
        free.add_metric([host.name], (host.free_ram_mb or 0) * 2**20)
        awake.add_metric([host.name], host.awake_sandboxes)
    return names, [age, free, awake]


def _redis_depth(queue: str) -> int:
    import redis

    names = [queue, *(f"{queue}{REDIS_PRIORITY_SEP}{step}" for step in REDIS_PRIORITY_STEPS)]
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=3)
    with client, client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(name)
        return sum(int(n) for n in pipe.execute())


def _folder_depth(queue: str) -> int:
    folder = Path(str(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"]))
    return sum(1 for _ in folder.glob(f"*.{queue}.msg"))


class HermitCollector(Collector):
    """Every Hermit series (see the module doc), computed when collected."""

    def collect(self) -> Iterator[Metric]:
        from sandboxes import chat_sessions

        since = timezone.now() - timedelta(seconds=settings.HERMIT_METRICS_WINDOW)
        yield sandbox_counts()
        starts, wakes = start_durations(since)
        yield starts.histogram(
            "hermit_sandbox_start_seconds", "Start times of the window's starts.", START_BUCKETS
        )
        yield wakes.histogram(
            "hermit_sandbox_wake_seconds", "Wake times of the window's wakes.", START_BUCKETS
        )
        backups = backup_durations(since)
        yield backups.histogram(
            "hermit_backup_seconds", "Durations of the window's backups.", BACKUP_BUCKETS
        )
        for name, doc, value in (
            ("hermit_sandbox_start_failures", "Starts that failed in the window.", starts),
            ("hermit_sandbox_wake_failures", "Wakes that failed in the window.", wakes),
            ("hermit_backup_failures", "Backups that failed in the window.", backups),
        ):
            yield GaugeMetricFamily(name, doc, value=value.failures)
        yield from ai_gateway(since)
        yield GaugeMetricFamily(
            "hermit_chat_sessions_open",
            "Browser chat sessions open now.",
            value=chat_sessions.open_sessions(),
        )
        host_names, host_metrics = sandbox_hosts(timezone.now())
        yield from host_metrics
        yield queue_depth(host_names)
        yield GaugeMetricFamily(
            "hermit_metrics_window_seconds",
            "The window the windowed series describe.",
            value=settings.HERMIT_METRICS_WINDOW,
        )


def render() -> bytes:
    """Return the exposition text of every Hermit series."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HermitCollector())
    return generate_latest(registry)
