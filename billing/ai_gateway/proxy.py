"""Forwarding one model call: authorise, limit, pick the upstream, stream through, meter.

Contract of ``forward``: it always returns a response in the caller's API format and always
writes exactly one UsageRecord for the call: when the response ends, fails, or is cancelled
because the client went away (Django raises CancelledError into the streaming iterator; the
upstream response is then closed, which cancels the upstream request). Bytes are relayed as
they arrive and never buffered whole. Provider keys go only to the upstream, never into logs
or responses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponseBase, StreamingHttpResponse
from django.utils import timezone

from billing.ai_gateway import credentials, limits
from billing.ai_gateway.errors import Kind, error_response
from billing.ai_gateway.metering import Usage, UsageMeter
from billing.ai_gateway.models import Api, UsageRecord
from billing.ai_gateway.upstreams import Target, choose_targets, find_price
from billing.models import Account, Plan, plan_for
from portal.lib import http

log = logging.getLogger(__name__)

ANTHROPIC_VERSION = "2023-06-01"
PASS_RESPONSE_HEADERS = ("content-type", "content-encoding", "request-id", "x-request-id")
MAX_BODY = 32 * 1024 * 1024


@dataclass
class Call:
    """What the gateway knows about one call; filled in as it proceeds."""

    api: str
    started: float = field(default_factory=time.monotonic)
    model: str = ""
    streaming: bool = False
    user_id: int | None = None
    sandbox_id: int | None = None
    requests_per_minute: int = 0
    targets: list[Target] = field(default_factory=list)
    target: Target | None = None
    fallback_used: bool = False

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


def _plan(user: Any) -> Plan:
    """Return the user's plan, from the row loaded with the credential when it is there."""
    try:
        return user.account.plan
    except Account.DoesNotExist:
        return plan_for(user)


def authorize(call: Call, key: str | None) -> None:
    """Identify the sandbox, check the quota and choose targets; raise Refused otherwise."""
    credential = credentials.authenticate(key)
    if credential is None:
        raise Refused(Kind.AUTH, "Invalid Hermit AI gateway key.")
    sandbox = credential.sandbox
    call.user_id, call.sandbox_id = sandbox.owner_id, sandbox.pk
    plan = _plan(sandbox.owner)
    call.requests_per_minute = plan.requests_per_minute
    call.targets = choose_targets(sandbox.owner_id, call.api, call.model)
    if not call.targets:
        raise Refused(Kind.NOT_FOUND, f"No upstream is configured for model {call.model!r}.")
    quota = plan.monthly_token_quota
    if quota and not call.targets[0].byok:
        used = limits.tokens_this_month(sandbox.owner_id)
        if used >= quota:
            resets = limits.next_month_start().date().isoformat()
            raise Refused(
                Kind.QUOTA,
                f"Hermit monthly token quota exhausted: {used:,} of {quota:,} tokens used "
                f"on the {plan.name} plan. It resets on {resets}; upgrade your plan or add "
                "your own provider key in Settings to continue.",
            )
    now = timezone.now()
    if credential.last_used_at is None or (now - credential.last_used_at).total_seconds() > 60:
        type(credential).objects.filter(pk=credential.pk).update(last_used_at=now)


def record(
    call: Call,
    outcome: str,
    status: int,
    usage: Usage | None = None,
    ttfb_ms: int | None = None,
    error: str = "",
) -> UsageRecord:
    """Write the call's UsageRecord, priced from the Price table."""
    usage = usage or Usage()
    cost = Decimal(0)
    target = call.target
    if usage.seen:
        for name in (target.model if target else "", call.model):
            price = find_price(name) if name else None
            if price is not None:
                cost = price.cost(usage.input_tokens, usage.output_tokens, usage.cached_tokens)
                break
    row = UsageRecord.objects.create(
        user_id=call.user_id,
        sandbox_id=call.sandbox_id,
        upstream_id=target.upstream_id if target else None,
        api=call.api,
        model=call.model[:200],
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_tokens=usage.cached_tokens,
        cost=cost,
        latency_ms=call.elapsed_ms(),
        ttfb_ms=ttfb_ms,
        status_code=status,
        outcome=outcome,
        byok=bool(target and target.byok),
        fallback_used=call.fallback_used,
        error=error[:300],
    )
    log.info(
        "ai call user=%s sandbox=%s model=%s target=%s status=%s outcome=%s in=%s out=%s ms=%s",
        call.user_id, call.sandbox_id, call.model, target.name if target else "-", status,
        outcome, usage.input_tokens, usage.output_tokens, row.latency_ms,
    )  # fmt: skip
    return row


arecord = sync_to_async(record)


async def refuse(call: Call, refusal: Refused) -> HttpResponseBase:
    """Record and answer a call the gateway refused or could not get answered upstream."""
    failed = refusal.kind in (Kind.UPSTREAM, Kind.TIMEOUT)
    outcome = UsageRecord.Outcome.ERROR if failed else UsageRecord.Outcome.REFUSED
    await arecord(call, outcome, refusal.kind.status, error=refusal.message)
    return error_response(call.api, refusal.kind, refusal.message, refusal.retry_after)


def upstream_request(call: Call, target: Target, body: dict[str, Any], raw: bytes,
                     request: HttpRequest) -> httpx.Request:  # fmt: skip
    """Build the upstream request: the target's key, the target's model, usage asked for."""
    changed = False
    if body.get("model") != target.model:
        body = {**body, "model": target.model}
        changed = True
    if call.api == Api.OPENAI and call.streaming:
        options = body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage")):
            body = {**body, "stream_options": {**(options or {}), "include_usage": True}}
            changed = True
    content = json.dumps(body).encode() if changed else raw
    headers = {
        "content-type": "application/json",
        "accept": request.headers.get("accept", "application/json"),
        "accept-encoding": "identity",
    }
    if call.api == Api.ANTHROPIC:
        headers["anthropic-version"] = request.headers.get("anthropic-version", ANTHROPIC_VERSION)
        if beta := request.headers.get("anthropic-beta"):
            headers["anthropic-beta"] = beta
        if target.api_key:
            headers["x-api-key"] = target.api_key
    elif target.api_key:
        headers["authorization"] = f"Bearer {target.api_key}"
    timeout = httpx.Timeout(target.timeout, connect=min(10.0, target.timeout))
    return http.client().build_request(
        "POST", target.url(call.api), content=content, headers=headers, timeout=timeout
    )


async def open_upstream(
    call: Call, body: dict[str, Any], raw: bytes, request: HttpRequest
) -> httpx.Response:
    """Send to the primary target, then to the fallback on 5xx, timeout or connection error.

    Return the upstream response with its body not yet read. Raise Refused if all failed.
    """
    client = http.client()
    failure: Refused | None = None
    for index, target in enumerate(call.targets):
        call.target, call.fallback_used = target, index > 0
        last = index == len(call.targets) - 1
        try:
            response = await client.send(
                upstream_request(call, target, body, raw, request), stream=True
            )
        except httpx.TimeoutException:
            failure = Refused(Kind.TIMEOUT, f"The model provider ({target.name}) timed out.")
            continue
        except httpx.TransportError as exc:
            failure = Refused(
                Kind.UPSTREAM,
                f"The model provider ({target.name}) is unreachable ({type(exc).__name__}).",
            )
            continue
        if response.status_code >= 500 and not last:
            await response.aclose()
            continue
        return response
    assert failure is not None
    raise failure


async def relay(call: Call, response: httpx.Response) -> AsyncIterator[bytes]:
    """Yield the upstream body as it arrives, metering it; record the call when it ends."""
    meter = UsageMeter(call.api, call.streaming)
    outcome = UsageRecord.Outcome.OK if response.status_code < 400 else UsageRecord.Outcome.ERROR
    error = ""
    ttfb: int | None = None
    try:
        async for chunk in response.aiter_raw():
            if ttfb is None:
                ttfb = call.elapsed_ms()
            meter.feed(chunk)
            yield chunk
    except asyncio.CancelledError:
        outcome, error = UsageRecord.Outcome.CANCELLED, "The client disconnected."
        raise
    except GeneratorExit:
        outcome, error = UsageRecord.Outcome.CANCELLED, "The client disconnected."
        raise
    except httpx.HTTPError as exc:
        outcome, error = UsageRecord.Outcome.ERROR, f"Upstream stream broke: {type(exc).__name__}"
    finally:
        await response.aclose()
        usage = meter.finish()
        if meter.stream_error and outcome == UsageRecord.Outcome.OK:
            outcome = UsageRecord.Outcome.ERROR
        error = error or meter.stream_error
        # Shielded: a second cancellation must not lose the usage of a call already paid for.
        await asyncio.shield(arecord(call, outcome, response.status_code, usage, ttfb, error))


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
    call.model, call.streaming = body["model"], bool(body.get("stream"))
    try:
        await sync_to_async(authorize)(call, presented_key(request))
        assert call.user_id is not None
        allowed, retry = await limits.check_rate(call.user_id, call.requests_per_minute)
        if not allowed:
            raise Refused(
                Kind.RATE_LIMIT,
                f"Too many model requests: your plan allows {call.requests_per_minute} a minute.",
                retry_after=retry,
            )
        upstream = await open_upstream(call, body, raw, request)
    except Refused as refusal:
        return await refuse(call, refusal)
    streaming = StreamingHttpResponse(relay(call, upstream), status=upstream.status_code)
    for name in PASS_RESPONSE_HEADERS:
        if name in upstream.headers:
            streaming[name] = upstream.headers[name]
    streaming["Cache-Control"] = "no-cache"
    streaming["X-Accel-Buffering"] = "no"
    return streaming
