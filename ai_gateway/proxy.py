"""Forwarding one model call: authorise, admit, pick the upstream, stream through, meter.

Contract of ``forward``: it always returns a response in the caller's API format and writes
exactly one UsageRecord per call, whatever happens:
1. ``authorize`` (in a worker thread): the sandbox credential (401), an active owner (403), an
   upstream (404); on the operator's keys, only priced models (404) and only allowed
   ``anthropic-beta`` values and provider-side tools (400). It estimates the call's worst case
   (request bytes / 4 as input, plus its max output) and, without Redis, admits it there.
2. Admission (``limits``): requests a minute, calls at once and the monthly quota (money and
   tokens), reserved atomically; with Redis in one Lua round trip. Refused calls count nowhere.
3. ``Relay``: a task of its own opens the upstream (the fallback on 5xx, timeout or connection
   error) and reads it to its end, metering it, while the response relays chunks as they
   arrive (never buffered whole). If the client goes away, the task keeps reading for up to
   HERMIT_AI_DRAIN_SECONDS, so the call is billed what the provider bills; if cut off then, or
   if no usage came, it is billed an estimate. The task then records the call (``usage_writer``
   batches the records of calls that end together) and settles its reservation, shielded from
   cancellation.
Provider keys go only to the upstream, never into logs or responses. Client-controlled text
(the model name) is logged with ``%r``, so it cannot forge log lines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Any

import aiohttp
from django.conf import settings
from django.contrib.auth import get_user_model
from django.http import HttpRequest, HttpResponseBase, StreamingHttpResponse
from django.utils import timezone

from ai_gateway import credentials, db, limits, usage_writer
from ai_gateway.errors import Kind, error_response
from ai_gateway.limits import Amount, Limits, Ticket, Verdict, to_micros
from ai_gateway.metering import Usage, UsageMeter
from ai_gateway.models import Api, Provider, SandboxCredential, UsageRecord
from ai_gateway.upstreams import Target, choose_targets, price_for
from billing.models import plan_for
from portal.lib import http

log = logging.getLogger(__name__)

ANTHROPIC_VERSION = "2023-06-01"
PASS_RESPONSE_HEADERS = ("content-type", "content-encoding", "request-id", "x-request-id")
MAX_BODY = 32 * 1024 * 1024


QUEUE_CHUNKS = 16  # chunks read ahead of a slow client
REQUEST_HEADERS = ("accept", "anthropic-version", "anthropic-beta")
_tasks: set[asyncio.Task[None]] = set()  # relays under way (the loop keeps only weak refs)


@dataclass
class Call:
    """What the gateway knows about one call; filled in as it proceeds."""

    api: str
    started: float = field(default_factory=time.monotonic)
    model: str = ""
    streaming: bool = False
    user_id: int | None = None
    sandbox_id: int | None = None
    plan_name: str = ""
    targets: list[Target] = field(default_factory=list)
    target: Target | None = None
    fallback_used: bool = False
    limits: Limits = field(default_factory=lambda: Limits(0, 0, 0, 0))
    reserve: Amount = field(default_factory=Amount)
    input_estimate: int = 0
    max_output: int = 0
    ticket: Ticket | None = None

    def elapsed_ms(self, since: float | None = None) -> int:
        return int(((since or time.monotonic()) - self.started) * 1000)


class Refused(Exception):
    def __init__(self, kind: Kind, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after


def presented_key(request: HttpRequest) -> str | None:
    """Return the credential from ``x-api-key`` or ``Authorization: Bearer``."""
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _plan(holder: credentials.KeyHolder) -> credentials.PlanLimits:
    """Return the owner's plan, read with the key; create their account if they have none."""
    if holder.plan is not None:
        return holder.plan
    plan = plan_for(get_user_model()(pk=holder.owner_id))
    return credentials.PlanLimits(
        plan.name, plan.requests_per_minute, plan.monthly_spend_limit, plan.monthly_token_quota
    )


def authorized_owner(key: str | None) -> credentials.KeyHolder:
    """Return who the key speaks for, if an active owner; else raise Refused (401, 403)."""
    holder = credentials.authenticate(key)
    if holder is None:
        raise Refused(Kind.AUTH, "Invalid Hermit AI gateway key.")
    if not holder.owner_active:
        raise Refused(Kind.FORBIDDEN, "This Hermit account is deactivated: model calls refused.")
    if holder.owner_suspended:
        raise Refused(Kind.FORBIDDEN, "This Hermit account is suspended: model calls refused.")
    return holder


def authorize(call: Call, key: str | None, body: dict[str, Any], size: int,
              headers: Mapping[str, str]) -> None:  # fmt: skip
    """Identify the sandbox, choose targets, apply the operator-key policy, estimate the call's
    worst case and (without Redis) admit it; raise Refused otherwise."""
    holder = authorized_owner(key)
    call.user_id, call.sandbox_id = holder.owner_id, holder.sandbox_id
    plan = _plan(holder)
    call.plan_name = plan.name
    targets = choose_targets(holder.owner_id, call.api, call.model, holder.user_keys)
    call.targets = payable_targets(call, targets)
    primary = call.targets[0]
    if not primary.byok:
        check_operator_policy(call.api, body, headers.get("anthropic-beta", ""))
    call.input_estimate, call.max_output = max(1, size // 4), max_output(body)
    if primary.byok:
        call.limits = Limits(
            plan.requests_per_minute, settings.HERMIT_AI_MAX_CONCURRENT_CALLS, 0, 0
        )
    else:
        price = price_for(primary, call.model)
        assert price is not None  # payable_targets made sure
        cost = price.cost(call.input_estimate, call.max_output, 0)
        call.reserve = Amount(to_micros(cost), call.input_estimate + call.max_output)
        call.limits = Limits(
            plan.requests_per_minute,
            settings.HERMIT_AI_MAX_CONCURRENT_CALLS,
            to_micros(plan.monthly_spend_limit),
            plan.monthly_token_quota,
        )
    if not limits.uses_redis():
        call.ticket = admitted(call, limits.admit_db(call.user_id, call.limits, call.reserve))
    now = timezone.now()
    if holder.last_used_at is None or (now - holder.last_used_at).total_seconds() > 60:
        SandboxCredential.objects.filter(pk=holder.credential_id).update(last_used_at=now)
        credentials.touched(holder, now)
    # A model call is the agent at work: it keeps the sandbox from dozing off mid-task (noted
    # in the cache only: no database query on this path).
    from sandboxes.sleep import note_model_call

    note_model_call(holder.sandbox_id)


def payable_targets(call: Call, targets: list[Target]) -> list[Target]:
    """Return the targets this call may use: the primary pays (operator key: the model must be
    priced, else 404), and a fallback only if the same party pays and, for us, it is priced."""
    if not targets:
        raise Refused(Kind.NOT_FOUND, f"No upstream is configured for model {call.model!r}.")
    primary = targets[0]
    if not primary.byok and price_for(primary, call.model) is None:
        raise Refused(
            Kind.NOT_FOUND,
            f"The model {call.model!r} is not available with Hermit's key. Use a listed model "
            "(GET /v1/models), or add your own provider key in Settings.",
        )
    return [primary] + [
        t for t in targets[1:]
        if t.byok == primary.byok and (t.byok or price_for(t, call.model) is not None)
    ]  # fmt: skip


def check_operator_policy(api: str, body: dict[str, Any], beta: str) -> None:
    """Refuse (400) what would cost more than tokens on the operator's key: betas and
    provider-side tools not allowed in settings."""
    if api == Api.ANTHROPIC:
        for value in (v.strip() for v in beta.split(",")):
            if value and value not in settings.HERMIT_AI_ANTHROPIC_BETAS:
                raise Refused(
                    Kind.BAD_REQUEST,
                    f"The anthropic-beta value {value!r} is not allowed with Hermit's key "
                    f"(allowed: {', '.join(settings.HERMIT_AI_ANTHROPIC_BETAS) or 'none'}).",
                )
        if body.get("mcp_servers"):
            raise Refused(Kind.BAD_REQUEST, "mcp_servers is not available with Hermit's key.")
    elif body.get("n") not in (None, 1):
        # n answers cost n times the output that was reserved for one.
        raise Refused(Kind.BAD_REQUEST, "Only n=1 is available with Hermit's key.")
    tier = body.get("service_tier")
    if tier not in STANDARD_TIERS[api]:
        # A premium tier is billed above the list prices the quota is counted in.
        raise Refused(
            Kind.BAD_REQUEST,
            f"The service_tier {tier!r} is not available with Hermit's key "
            f"(allowed: {', '.join(t for t in STANDARD_TIERS[api] if t)}).",
        )
    for kind in provider_tools(api, body):
        if not any(fnmatch.fnmatchcase(kind, p) for p in settings.HERMIT_AI_SERVER_TOOLS):
            raise Refused(
                Kind.BAD_REQUEST,
                f"The provider-side tool {kind!r} is not available with Hermit's key; "
                "use your own tools, or your own provider key.",
            )


def provider_tools(api: str, body: dict[str, Any]) -> list[str]:
    """Return the types of the tools in ``body`` that the provider runs (and bills) itself."""
    tools = body.get("tools")
    kinds = [str(t.get("type")) for t in tools if isinstance(t, dict)] if isinstance(
        tools, list) else []  # fmt: skip
    if api == Api.ANTHROPIC:
        found = [k for k in kinds if k not in ("None", "custom")]
    else:
        found = [k for k in kinds if k not in ("function", "custom")]
        if body.get("web_search_options") is not None:
            found.append("web_search")
    return found


STANDARD_TIERS: dict[str, tuple[str | None, ...]] = {
    Api.OPENAI: (None, "auto", "default", "flex"),
    Api.ANTHROPIC: (None, "auto", "standard_only"),
}


def requested_output(body: dict[str, Any]) -> int | None:
    """Return the output tokens the call itself limits itself to, or None if it sets none."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def max_output(body: dict[str, Any]) -> int:
    """Return the most output tokens the call asks for (a default when it sets none)."""
    requested = requested_output(body)
    if requested is None:
        return int(settings.HERMIT_AI_DEFAULT_MAX_OUTPUT)
    return min(requested, OUTPUT_CEILING)


def admitted(call: Call, verdict: Verdict) -> Ticket:
    """Return the verdict's ticket, or raise Refused saying which limit refused the call."""
    if verdict.ticket is not None:
        return verdict.ticket
    resets = limits.next_month_start().date().isoformat()
    tail = (f" It resets on {resets}; upgrade your plan or add your own provider key in "
            "Settings to continue.")  # fmt: skip
    if verdict.reason == "rate":
        raise Refused(
            Kind.RATE_LIMIT,
            f"Too many model requests: your plan allows {call.limits.requests_per_minute} "
            "a minute.",
            retry_after=verdict.retry_after,
        )
    if verdict.reason == "busy":
        raise Refused(
            Kind.RATE_LIMIT,
            f"Too many model calls at once: at most {verdict.limit} may run together.",
            retry_after=verdict.retry_after,
        )
    if verdict.reason == "cost":
        raise Refused(
            Kind.QUOTA,
            f"Hermit monthly spend limit reached: ${verdict.used / 1e6:.2f} of "
            f"${verdict.limit / 1e6:.2f} used or reserved on the {call.plan_name} plan, and this "
            f"call may cost up to ${call.reserve.cost / 1e6:.4f}." + tail,
        )
    if verdict.used >= verdict.limit:
        raise Refused(
            Kind.QUOTA,
            f"Hermit monthly token quota exhausted: {verdict.used:,} of {verdict.limit:,} tokens "
            f"used on the {call.plan_name} plan." + tail,
        )
    raise Refused(
        Kind.QUOTA,
        f"Hermit monthly token quota would be exceeded: {verdict.used:,} of {verdict.limit:,} "
        f"tokens used or reserved on the {call.plan_name} plan, and this call may use up to "
        f"{call.reserve.tokens:,}." + tail,
    )


async def admit_redis(call: Call) -> None:
    """Admit the call on Redis (after ``authorize``, which admits it itself without Redis)."""
    if call.ticket is not None:
        return
    assert call.user_id is not None
    lim = call.limits
    if not (lim.requests_per_minute or lim.max_concurrent or lim.cost or lim.tokens):
        call.ticket = Ticket(call.user_id, limits.month_start().date(), Amount(), "none")
        return
    call.ticket = admitted(call, await limits.admit_redis(call.user_id, lim, call.reserve))


TOKEN_CEILING = 2**31 - 1  # the token columns' range; a client's or upstream's figure is capped
OUTPUT_CEILING = 1_000_000  # more output than any model writes in one call


def _bounded(usage: Usage) -> Usage:
    """Return ``usage`` with counts the record can hold, so an absurd figure (a client's
    max_tokens in an estimate, a broken upstream) can never make the record fail to save."""
    return dataclasses.replace(
        usage,
        input_tokens=min(usage.input_tokens, TOKEN_CEILING),
        output_tokens=min(usage.output_tokens, TOKEN_CEILING),
        cached_tokens=min(usage.cached_tokens, TOKEN_CEILING),
    )


def usage_row(call: Call, outcome: str, status: int, usage: Usage | None, ttfb_ms: int | None,
              error: str, latency_ms: int) -> tuple[UsageRecord, Ticket | None]:  # fmt: skip
    """Return the call's UsageRecord (unsaved, priced from the Price table) and its database
    ticket to settle, if any. Logs the call."""
    usage = _bounded(usage or Usage())
    cost = Decimal(0)
    target = call.target
    if usage.seen and target is not None:
        price = price_for(target, call.model)
        if price is not None:
            cost = price.cost(usage.input_tokens, usage.output_tokens, usage.cached_tokens)
    row = UsageRecord(
        user_id=call.user_id,
        sandbox_id=call.sandbox_id,
        upstream_id=target.upstream_id if target else None,
        api=call.api,
        model=call.model[:200],
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_tokens=usage.cached_tokens,
        cost=cost,
        latency_ms=latency_ms,
        ttfb_ms=ttfb_ms,
        status_code=status,
        outcome=outcome,
        byok=bool(target and target.byok),
        fallback_used=call.fallback_used,
        error=error[:300],
    )
    log.info(
        "ai call user=%s sandbox=%s model=%r target=%r status=%s outcome=%s in=%s out=%s ms=%s",
        call.user_id, call.sandbox_id, call.model, target.name if target else "-", status,
        outcome, usage.input_tokens, usage.output_tokens, latency_ms,
    )  # fmt: skip
    ticket = call.ticket if call.ticket is not None and call.ticket.store == "db" else None
    return row, ticket


async def finish(call: Call, outcome: str, status: int, usage: Usage | None = None,
                 ttfb_ms: int | None = None, error: str = "") -> None:  # fmt: skip
    """Record the call and settle its ticket. Await it shielded: it must not be lost."""
    latency = call.elapsed_ms()
    row = await usage_writer.write(
        partial(usage_row, call, outcome, status, usage, ttfb_ms, error, latency)
    )
    if call.ticket is not None:
        await limits.settle_redis(call.ticket, usage_writer.spent(row))


async def refuse(call: Call, refusal: Refused) -> HttpResponseBase:
    """Record and answer a call the gateway refused before sending it upstream. A caller with
    no valid key is answered but not recorded: anyone can send those, as many as they like."""
    if call.user_id is not None:
        await asyncio.shield(finish(call, UsageRecord.Outcome.REFUSED, refusal.kind.status,
                                    error=refusal.message))  # fmt: skip
    return error_response(call.api, refusal.kind, refusal.message, refusal.retry_after)


@dataclass(frozen=True)
class UpstreamRequest:
    """One request to send upstream. ``headers`` hold the provider key: never log them."""

    url: str
    content: bytes
    headers: dict[str, str] = field(repr=False)
    timeout: aiohttp.ClientTimeout


def upstream_request(call: Call, target: Target, body: dict[str, Any],
                     headers_in: Mapping[str, str]) -> UpstreamRequest:  # fmt: skip
    """Build the upstream request: the target's key, the target's model, usage asked for and,
    on Hermit's key, output capped at what was reserved.

    The body sent is always the one parsed here, re-serialized, so the upstream reads exactly
    what was priced (a raw body with a duplicate "model" key could name another model)."""
    body = {**body, "model": target.model}
    if call.api == Api.OPENAI and call.streaming:
        options = body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage")):
            body["stream_options"] = {**(options or {}), "include_usage": True}
    if not target.byok and requested_output(body) is None:
        # The reservation assumed this many output tokens: never let the model write more.
        name = "max_completion_tokens" if target.provider == Provider.OPENAI else "max_tokens"
        body[name] = call.max_output
    content = json.dumps(body).encode()
    headers = {
        "content-type": "application/json",
        "accept": headers_in.get("accept") or "application/json",
        "accept-encoding": "identity",
    }
    if call.api == Api.ANTHROPIC:
        headers["anthropic-version"] = headers_in.get("anthropic-version") or ANTHROPIC_VERSION
        if beta := headers_in.get("anthropic-beta"):
            headers["anthropic-beta"] = beta
        if target.api_key:
            headers["x-api-key"] = target.api_key
    elif target.api_key:
        headers["authorization"] = f"Bearer {target.api_key}"
    # The target's timeout bounds the wait for the response to start and between chunks.
    timeout = aiohttp.ClientTimeout(
        total=None, connect=min(10.0, target.timeout), sock_read=target.timeout
    )
    return UpstreamRequest(target.url(call.api), content, headers, timeout)


async def send(request: UpstreamRequest) -> aiohttp.ClientResponse:
    """Send ``request``; return the response with its body not yet read."""
    return await http.client().post(
        request.url, data=request.content, headers=request.headers, timeout=request.timeout,
        allow_redirects=False,
    )  # fmt: skip


async def open_upstream(call: Call, body: dict[str, Any],
                        headers: Mapping[str, str]) -> aiohttp.ClientResponse:  # fmt: skip
    """Send to the primary target, then to the fallback on 5xx, timeout or connection error.

    Return the upstream response with its body not yet read. Raise Refused if all failed.
    """
    failure: Refused | None = None
    for index, target in enumerate(call.targets):
        call.target, call.fallback_used = target, index > 0
        last = index == len(call.targets) - 1
        try:
            response = await send(upstream_request(call, target, body, headers))
        except TimeoutError:
            failure = Refused(Kind.TIMEOUT, f"The model provider ({target.name}) timed out.")
            continue
        except aiohttp.ClientError as exc:
            failure = Refused(
                Kind.UPSTREAM,
                f"The model provider ({target.name}) is unreachable ({type(exc).__name__}).",
            )
            continue
        if response.status >= 500 and not last:
            response.close()
            continue
        return response
    assert failure is not None
    raise failure


class Relay:
    """One admitted call's trip upstream, in a task that outlives the client if it must.

    ``opened`` resolves to the upstream response (or Refused); ``body()`` yields its chunks. If
    the client goes away (``client_gone``), the task keeps reading, unrelayed, for at most
    HERMIT_AI_DRAIN_SECONDS. No call lives longer than HERMIT_AI_MAX_CALL_SECONDS (shorter than
    the quota lease, so a live call never loses its reservation). The task always ends by
    recording the call and settling it.
    """

    def __init__(self, call: Call, body: dict[str, Any],
                 headers: Mapping[str, str]) -> None:  # fmt: skip
        self.call = call
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_CHUNKS)
        self.opened: asyncio.Future[aiohttp.ClientResponse] = (
            asyncio.get_running_loop().create_future()
        )
        self.gone = False
        self.expired = False
        self.reading = True
        self.task = asyncio.create_task(self._run(body, headers))
        _tasks.add(self.task)
        self.task.add_done_callback(_tasks.discard)
        asyncio.get_running_loop().call_later(settings.HERMIT_AI_MAX_CALL_SECONDS, self._expire)

    async def _run(self, body: dict[str, Any], headers: Mapping[str, str]) -> None:
        call = self.call
        try:
            response = await open_upstream(call, body, headers)
        except Refused as refusal:
            self.reading = False
            self.opened.set_exception(refusal)
            outcome = UsageRecord.Outcome.ERROR
            await asyncio.shield(finish(call, outcome, refusal.kind.status, error=refusal.message))
            return
        except asyncio.CancelledError:
            # The client left while the provider was still working, and the drain time is up.
            self.reading = False
            usage = Usage(call.input_estimate, call.max_output, 0, True)
            error = "The client disconnected; cut off before the answer started (estimated)."
            if self.expired:
                error = "The call passed its time limit before the answer started (estimated)."
            outcome = UsageRecord.Outcome.CANCELLED
            await asyncio.shield(finish(call, outcome, 0, usage, None, error))
            return
        self.opened.set_result(response)
        await self._pump(response)

    async def _pump(self, response: aiohttp.ClientResponse) -> None:
        call = self.call
        meter = UsageMeter(call.api, call.streaming)
        ok = response.status < 400
        outcome = UsageRecord.Outcome.OK if ok else UsageRecord.Outcome.ERROR
        error, ttfb, cut, broke = "", None, False, False
        try:
            async for chunk in response.content.iter_any():
                if ttfb is None:
                    ttfb = call.elapsed_ms()
                meter.feed(chunk)
                if not self.gone:
                    await self.queue.put(chunk)
        except asyncio.CancelledError:
            cut = True
        except (aiohttp.ClientError, TimeoutError) as exc:
            broke = True
            outcome, error = (
                UsageRecord.Outcome.ERROR,
                f"Upstream stream broke: {type(exc).__name__}",
            )
        self.reading = False
        if not self.gone:
            await self.queue.put(None)
            # Let the response send what it holds before the record's thread competes for the GIL.
            await asyncio.sleep(0)
        if cut or broke:
            response.close()  # the connection is in an unknown state: do not reuse it
        else:
            response.release()
        usage = meter.finish()
        if meter.stream_error and outcome == UsageRecord.Outcome.OK:
            outcome = UsageRecord.Outcome.ERROR
        error = error or meter.stream_error
        if self.gone:
            outcome = UsageRecord.Outcome.CANCELLED
            error = "The client disconnected; the answer was read to its end."
        if cut:
            error = "The client disconnected; cut off after the drain time (estimated)."
            if self.expired:
                outcome = UsageRecord.Outcome.ERROR
                error = "The call passed its time limit and was cut off (estimated)."
        usage, estimated = estimate(call, usage, meter, ok, broke, cut)
        if estimated and not (cut or broke):
            error = (error + " Usage estimated: the provider reported none.").strip()
        await asyncio.shield(finish(call, outcome, response.status, usage, ttfb, error))

    async def body(self) -> AsyncIterator[bytes]:
        """Yield the upstream body as it arrives; tell the task when the client is gone."""
        ended = False
        try:
            while (chunk := await self.queue.get()) is not None:
                yield chunk
            ended = True
            # The response ends once the call is recorded, as clients (and tests) expect.
            await asyncio.shield(self.task)
        finally:
            if not ended:
                self.client_gone()

    def client_gone(self) -> None:
        """Stop relaying; keep reading (and billing) for at most HERMIT_AI_DRAIN_SECONDS."""
        if self.gone:
            return
        self.gone = True
        while not self.queue.empty():
            self.queue.get_nowait()  # unblocks the task if it waits on a full queue
        self.opened.add_done_callback(lambda f: f.cancelled() or f.exception())
        if self.reading:
            asyncio.get_running_loop().call_later(settings.HERMIT_AI_DRAIN_SECONDS, self._cut)

    def _cut(self) -> None:
        if self.reading:
            self.task.cancel()

    def _expire(self) -> None:
        if self.reading:
            self.expired = True
            self.task.cancel()


def estimate(call: Call, usage: Usage, meter: UsageMeter, ok: bool, broke: bool,
             cut: bool) -> tuple[Usage, bool]:  # fmt: skip
    """Return (usage to bill, whether it is an estimate).

    Cut off after the drain time: the provider went on generating, so the input seen (else the
    request's estimate) and the call's max output. The stream broke: the input seen (else the
    estimate) and the output seen (at least one token per SSE event). A successful answer with
    no usage: the input estimate and the output seen (SSE events, or body bytes / 4).
    """
    inp = usage.input_tokens or call.input_estimate
    if cut:
        return Usage(
            inp, max(usage.output_tokens, call.max_output), usage.cached_tokens, True
        ), True
    if broke:
        return Usage(inp, max(usage.output_tokens, meter.events), usage.cached_tokens, True), True
    if usage.seen or not ok:
        return usage, False
    seen = meter.events if call.streaming else meter.body_size // 4
    return Usage(call.input_estimate, seen, 0, True), True


async def forward(request: HttpRequest, api: str) -> HttpResponseBase:
    """Handle one POST to the chat-completions or messages endpoint."""
    call = Call(api=api)
    raw = request.body
    try:
        body = json.loads(raw) if len(raw) <= MAX_BODY else None
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return error_response(api, Kind.BAD_REQUEST, "The body must be JSON with a 'model'.")
    if not isinstance(body.get("stream", False), bool):
        return error_response(api, Kind.BAD_REQUEST, "'stream' must be true or false.")
    call.model, call.streaming = body["model"], bool(body.get("stream"))
    headers = {name: request.headers.get(name, "") for name in REQUEST_HEADERS}
    try:
        await db.run(authorize, call, presented_key(request), body, len(raw), headers)
        await admit_redis(call)
    except Refused as refusal:
        return await refuse(call, refusal)
    relay = Relay(call, body, headers)
    try:
        upstream = await asyncio.shield(relay.opened)
    except Refused as refusal:  # recorded by the relay
        return error_response(api, refusal.kind, refusal.message, refusal.retry_after)
    except asyncio.CancelledError:
        relay.client_gone()
        raise
    streaming = StreamingHttpResponse(relay.body(), status=upstream.status)
    for name in PASS_RESPONSE_HEADERS:
        if name in upstream.headers:
            streaming[name] = upstream.headers[name]
    streaming["Cache-Control"] = "no-cache"
    streaming["X-Accel-Buffering"] = "no"
    return streaming
