"""A local fake of the parts of Stripe's API that Hermit uses, speaking Stripe's wire format.

A real HTTP server on 127.0.0.1 (aiohttp, in a background thread, on a random port) that the
real stripe SDK talks to once ``api_base`` points at it:

- Requests are authenticated with ``Authorization: Bearer <secret key>``; any other key gets
  Stripe's 401. POST bodies are form-encoded with bracket notation (``line_items[0][price]``,
  ``metadata[key]``), parsed into nested objects as Stripe does. ``Idempotency-Key`` replays the
  first answer. Errors are Stripe's ``{"error": {"type", "message", "param", "code"}}`` bodies.
- ``POST /v1/customers``, ``GET /v1/customers/{id}``
- ``POST /v1/checkout/sessions`` (mode=subscription): its ``url`` is the fake's own hosted
  Checkout page, ``GET /c/pay/{id}``, whose "Pay" button (``POST /c/pay/{id}``) creates the
  subscription and its paid invoice, sends the webhooks, and redirects to ``success_url``
  (``{CHECKOUT_SESSION_ID}`` filled in). ``GET /v1/checkout/sessions/{id}``.
  ``POST /v1/checkout/sessions/{id}/expire``: an open session is expired (its page and
  ``pay`` refuse it from then on, as Stripe's do); any other is refused with a 400.
  ``checkout.session.expired`` waits in ``outbox``.
- ``GET /v1/subscriptions/{id}`` (API 2026-10-28: the period lives on the subscription item),
  ``GET /v1/subscriptions`` (a list object, by ``customer`` and ``status``, paged by
  ``limit`` and ``starting_after``). ``DELETE /v1/subscriptions/{id}`` cancels at once
  (``invoice_now``, ``prorate`` recorded in ``requests``); ``customer.subscription.deleted``
  waits in ``outbox`` (an API call's events are queued, never POSTed from inside it).
- ``POST /v1/billing_portal/sessions``: its ``url`` is a fake portal page,
  ``GET /p/session/{id}``, offering "Cancel plan" (``POST /p/session/{id}/cancel``): the
  subscription is set to cancel at period end and ``customer.subscription.updated`` is sent.

Webhooks are events (``object: "event"``) signed as Stripe signs them: ``Stripe-Signature:
t=<unix time>,v1=<HMAC-SHA256(secret, "<t>.<payload>")>`` (the SDK's own signing helper). With
``webhook_url`` set they are POSTed there (after the page's action, before its redirect);
without it they wait in ``outbox`` for the test to deliver (``take()``).

Faults: ``failing[path] = n`` answers the next n requests to ``path`` with Stripe's 500;
``slow[path] = seconds`` answers them that late.

Test controls, standing in for time passing and banks answering at Stripe: ``create_price``,
``pay`` (what the Pay button does), ``cancel_at_period_end`` (the portal's button),
``end_period`` (the period ends: a cancelling subscription is deleted, another renews),
``fail_payment`` and ``pay_invoice`` (a renewal's charge fails or succeeds), ``resend``.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import httpx
import stripe
from aiohttp import web

API_VERSION = "2026-10-28.endive"
PERIOD = 30 * 24 * 3600


@dataclass(frozen=True)
class Delivery:
    """One webhook as Stripe sends it: the exact body and its signature header."""

    event: dict[str, Any]
    payload: str
    signature: str

    @property
    def type(self) -> str:
        return str(self.event["type"])


class StripeError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind

    def response(self) -> web.Response:
        error: dict[str, Any] = {"type": self.kind, "message": self.message}
        if self.param:
            error["param"] = self.param
        if self.code:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        return web.json_response({"error": error}, status=self.status, headers=_request_id())


def _request_id() -> dict[str, str]:
    return {"Request-Id": f"req_{secrets.token_hex(7)}", "Stripe-Version": API_VERSION}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(18).replace('-', 'a').replace('_', 'b')}"


def parse_form(body: str) -> dict[str, Any]:
    """Parse a form body with Stripe's bracket notation into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        parts = re.findall(r"[^\[\]]+", key)
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    node = {k: _lists(v) for k, v in node.items()}
    if node and all(k.isdigit() for k in node):
        return [node[k] for k in sorted(node, key=int)]
    return node


class FakeStripe:
    """The fake. ``start()`` serves it; ``url`` is the api_base; ``stop()`` ends it."""

    def __init__(self) -> None:
        self.api_key = "sk_test_" + secrets.token_hex(12)
        self.webhook_secret = "whsec_" + secrets.token_hex(16)
        self.port = 0
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.reset()

    # --- state -----------------------------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            self.webhook_url: str | None = None
            self.customers: dict[str, dict[str, Any]] = {}
            self.prices: dict[str, dict[str, Any]] = {}
            self.sessions: dict[str, dict[str, Any]] = {}
            self.subscriptions: dict[str, dict[str, Any]] = {}
            self.invoices: dict[str, dict[str, Any]] = {}
            self.portal_sessions: dict[str, dict[str, Any]] = {}
            self.events: list[dict[str, Any]] = []
            self.outbox: list[Delivery] = []
            self.delivered: list[tuple[Delivery, int]] = []
            self.requests: list[tuple[str, str, dict[str, Any]]] = []
            # Faults for the next requests to a path: answered 500, or answered late (seconds).
            self.failing: dict[str, int] = {}
            self.slow: dict[str, float] = {}
            self._idempotent: dict[str, tuple[int, Any]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_price(self, amount_cents: int, product_name: str = "Pro") -> str:
        """Create a monthly USD price (as one would in Stripe's dashboard); return its id."""
        now = int(time.time())
        product = _new_id("prod")
        price = {
            "id": _new_id("price"),
            "object": "price",
            "active": True,
            "billing_scheme": "per_unit",
            "created": now,
            "currency": "usd",
            "livemode": False,
            "lookup_key": None,
            "metadata": {},
            "nickname": product_name,
            "product": product,
            "recurring": {"interval": "month", "interval_count": 1, "usage_type": "licensed"},
            "type": "recurring",
            "unit_amount": amount_cents,
            "unit_amount_decimal": str(amount_cents),
        }
        with self._lock:
            self.prices[price["id"]] = price
        return str(price["id"])

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeStripe:
        self._thread = threading.Thread(target=self._run, name="fake-stripe", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the fake Stripe API did not start")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.run_until_complete(self._serve())
        self._started.set()
        loop.run_forever()
        if self._runner is not None:
            loop.run_until_complete(self._runner.cleanup())
        loop.close()

    async def _serve(self) -> None:
        app = web.Application(middlewares=[self._errors])
        api = [
            ("POST", "/v1/customers", self.api_create_customer),
            ("GET", "/v1/customers/{id}", self.api_get("customers")),
            ("POST", "/v1/checkout/sessions", self.api_create_session),
            ("GET", "/v1/checkout/sessions/{id}", self.api_get("sessions")),
            ("POST", "/v1/checkout/sessions/{id}/expire", self.api_expire_session),
            ("GET", "/v1/subscriptions", self.api_list_subscriptions),
            ("GET", "/v1/subscriptions/{id}", self.api_get("subscriptions")),
            ("DELETE", "/v1/subscriptions/{id}", self.api_cancel_subscription),
            ("POST", "/v1/billing_portal/sessions", self.api_create_portal_session),
        ]
        for method, path, handler in api:
            app.router.add_route(method, path, self._api(handler))
        app.router.add_get("/c/pay/{id}", self.checkout_page)
        app.router.add_post("/c/pay/{id}", self.checkout_pay)
        app.router.add_get("/p/session/{id}", self.portal_page)
        app.router.add_post("/p/session/{id}/cancel", self.portal_cancel)
        app.router.add_route("*", "/v1/{tail:.*}", self._api(self.api_unknown))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    # --- the API ---------------------------------------------------------------------------
    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except StripeError as exc:
            return exc.response()

    def _api(
        self, handler: Callable[[web.Request, dict[str, Any]], dict[str, Any]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def serve(request: web.Request) -> web.Response:
            auth = request.headers.get("Authorization", "")
            if auth != f"Bearer {self.api_key}":
                given = auth.removeprefix("Bearer ")
                masked = f"{given[:8]}{'*' * 12}{given[-4:]}" if given else ""
                raise StripeError(
                    401,
                    f"Invalid API Key provided: {masked}"
                    if given
                    else "You did not provide an API key.",
                )
            body = await request.text()
            params = parse_form(body if request.method == "POST" else request.query_string)
            key = request.headers.get("Idempotency-Key")
            with self._lock:
                self.requests.append((request.method, request.path, params))
                delay = self.slow.get(request.path, 0.0)
                fail = self.failing.get(request.path, 0)
                if fail:
                    self.failing[request.path] = fail - 1
            if delay:
                await asyncio.sleep(delay)
            if fail:
                raise StripeError(500, "An unknown error occurred (planted).", kind="api_error")
            with self._lock:
                if key and key in self._idempotent:
                    status, replay = self._idempotent[key]
                    return web.json_response(replay, status=status, headers=_request_id())
                result = handler(request, params)
                if key:
                    self._idempotent[key] = (200, result)
            return web.json_response(result, headers=_request_id())

        return serve

    def api_unknown(self, request: web.Request, params: dict[str, Any]) -> dict[str, Any]:
        raise StripeError(
            404,
            f"Unrecognized request URL ({request.method}: {request.path}). Please see "
            "https://stripe.com/docs or we can help at https://support.stripe.com/.",
        )

    def api_get(self, kind: str) -> Callable[[web.Request, dict[str, Any]], dict[str, Any]]:
        names = {
            "customers": "customer",
            "sessions": "checkout.session",
            "subscriptions": "subscription",
        }

        def get(request: web.Request, params: dict[str, Any]) -> dict[str, Any]:
            object_id = request.match_info["id"]
            found = getattr(self, kind).get(object_id)
            if found is None:
                raise StripeError(
                    404,
                    f"No such {names[kind]}: '{object_id}'",
                    param="id",
                    code="resource_missing",
                )
            return self._public(found)

        return get

    def api_list_subscriptions(
        self, request: web.Request, params: dict[str, Any]
    ) -> dict[str, Any]:
        """Stripe's list: oldest last, one page of ``limit`` (default 10) after
        ``starting_after``; without ``status`` canceled ones are left out, ``status=all``
        lists every one."""
        status = params.get("status")
        found = [
            s
            for s in reversed(list(self.subscriptions.values()))
            if s["customer"] == params.get("customer", s["customer"])
            and (
                status == "all"
                or s["status"] == status
                or (not status and s["status"] != "canceled")
            )
        ]
        after = params.get("starting_after")
        if after:
            ids = [s["id"] for s in found]
            found = found[ids.index(after) + 1 :] if after in ids else []
        limit = int(params.get("limit") or 10)
        return {
            "object": "list",
            "data": [self._public(s) for s in found[:limit]],
            "has_more": len(found) > limit,
            "url": "/v1/subscriptions",
        }

    def api_create_customer(self, request: web.Request, params: dict[str, Any]) -> dict[str, Any]:
        customer = {
            "id": _new_id("cus"),
            "object": "customer",
            "address": None,
            "balance": 0,
            "created": int(time.time()),
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": params.get("description"),
            "email": params.get("email"),
            "invoice_prefix": secrets.token_hex(4).upper(),
            "livemode": False,
            "metadata": params.get("metadata") or {},
            "name": params.get("name"),
            "phone": None,
            "preferred_locales": [],
            "tax_exempt": "none",
        }
        self.customers[customer["id"]] = customer
        return customer

    def _require(self, params: dict[str, Any], name: str) -> Any:
        if not params.get(name):
            raise StripeError(
                400, f"Missing required param: {name}.", param=name, code="parameter_missing"
            )
        return params[name]

    def _customer(self, customer_id: str, param: str = "customer") -> dict[str, Any]:
        if customer_id not in self.customers:
            raise StripeError(
                400, f"No such customer: '{customer_id}'", param=param, code="resource_missing"
            )
        return self.customers[customer_id]

    def api_create_session(self, request: web.Request, params: dict[str, Any]) -> dict[str, Any]:
        mode = self._require(params, "mode")
        if mode != "subscription":
            raise StripeError(
                400, f"Invalid mode: the fake supports 'subscription', not {mode!r}", param="mode"
            )
        items = self._require(params, "line_items")
        self._require(params, "success_url")
        if not isinstance(items, list) or len(items) != 1:
            raise StripeError(400, "The fake takes exactly one line item.", param="line_items")
        price_id = items[0].get("price", "")
        if price_id not in self.prices:
            raise StripeError(
                400,
                f"No such price: '{price_id}'",
                param="line_items[0][price]",
                code="resource_missing",
            )
        customer = params.get("customer")
        if customer:
            self._customer(customer)
        session_id = _new_id("cs_test")
        now = int(time.time())
        price = self.prices[price_id]
        session = {
            "id": session_id,
            "object": "checkout.session",
            "amount_subtotal": price["unit_amount"],
            "amount_total": price["unit_amount"],
            "cancel_url": params.get("cancel_url"),
            "client_reference_id": params.get("client_reference_id"),
            "created": now,
            "currency": "usd",
            "customer": customer,
            "customer_email": params.get("customer_email"),
            "expires_at": now + 24 * 3600,
            "invoice": None,
            "livemode": False,
            "metadata": params.get("metadata") or {},
            "mode": "subscription",
            "payment_status": "unpaid",
            "status": "open",
            "subscription": None,
            "success_url": params["success_url"],
            "ui_mode": "hosted",
            "url": f"{self.url}/c/pay/{session_id}",
            # Not part of Stripe's Session object; the fake keeps what it needs to charge.
            "_price": price_id,
            "_subscription_metadata": (params.get("subscription_data") or {}).get("metadata") or {},
        }
        self.sessions[session_id] = session
        return self._public(session)

    def api_expire_session(self, request: web.Request, params: dict[str, Any]) -> dict[str, Any]:
        """Expire an open session (it can no longer be paid) and send
        ``checkout.session.expired``; a session that is not open is refused, as Stripe does."""
        session_id = request.match_info["id"]
        session = self.sessions.get(session_id)
        if session is None:
            raise StripeError(
                404,
                f"No such checkout.session: '{session_id}'",
                param="session",
                code="resource_missing",
            )
        if session["status"] != "open":
            raise StripeError(
                400,
                f'Only Checkout Sessions with a status in ["open"] can be expired. This '
                f'Checkout Session has a status of "{session["status"]}".',
            )
        session.update(status="expired", url=None)
        self.outbox.append(self._event("checkout.session.expired", self._public(session)))
        return self._public(session)

    def api_cancel_subscription(
        self, request: web.Request, params: dict[str, Any]
    ) -> dict[str, Any]:
        """Cancel a subscription at once (``invoice_now``, ``prorate`` are recorded in
        ``requests``) and send ``customer.subscription.deleted``; an already canceled one is
        refused."""
        subscription_id = request.match_info["id"]
        sub = self.subscriptions.get(subscription_id)
        if sub is None:
            raise StripeError(
                404,
                f"No such subscription: '{subscription_id}'",
                param="id",
                code="resource_missing",
            )
        if sub["status"] == "canceled":
            raise StripeError(
                400,
                "A canceled subscription can only update its cancellation_details and metadata.",
            )
        now = int(time.time())
        sub.update(
            status="canceled",
            ended_at=now,
            canceled_at=now,
            cancellation_details={
                "comment": None,
                "feedback": None,
                "reason": "cancellation_requested",
            },
        )
        self.outbox.append(self._event("customer.subscription.deleted", sub))
        return self._public(sub)

    def api_create_portal_session(
        self, request: web.Request, params: dict[str, Any]
    ) -> dict[str, Any]:
        customer = self._customer(self._require(params, "customer"))
        session = {
            "id": _new_id("bps"),
            "object": "billing_portal.session",
            "configuration": "bpc_fake",
            "created": int(time.time()),
            "customer": customer["id"],
            "flow": None,
            "livemode": False,
            "locale": None,
            "on_behalf_of": None,
            "return_url": params.get("return_url"),
        }
        session["url"] = f"{self.url}/p/session/{session['id']}"
        self.portal_sessions[session["id"]] = session
        return session

    @staticmethod
    def _public(obj: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in obj.items() if not k.startswith("_")}

    # --- hosted pages ----------------------------------------------------------------------
    async def checkout_page(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return web.Response(status=404, text="No such checkout session")
        if session["status"] != "open":
            return self._session_gone(session)
        price = self.prices[session["_price"]]
        email = self.customers.get(session["customer"] or "", {}).get("email") or ""
        page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>Checkout</title>
<style>body{{font-family:system-ui,sans-serif;background:#f6f9fc;display:flex;
justify-content:center;padding:60px}}main{{background:#fff;padding:32px 40px;border-radius:8px;
box-shadow:0 2px 8px rgba(0,0,0,.08);min-width:340px}}button{{background:#635bff;color:#fff;
border:0;border-radius:6px;padding:12px;width:100%;font-size:1rem;cursor:pointer}}</style>
</head><body><main><p>Test mode · fake Stripe Checkout</p>
<h1>{html.escape(str(price["nickname"]))}</h1>
<p id="amount">${price["unit_amount"] / 100:.2f} per month</p>
<p>{html.escape(email)}</p><p>Card: 4242 4242 4242 4242</p>
<form method="post"><button type="submit" id="pay">Pay</button></form>
<p><a href="{html.escape(session["cancel_url"] or "")}">Back</a></p></main></body></html>"""
        return web.Response(text=page, content_type="text/html")

    async def checkout_pay(self, request: web.Request) -> web.Response:
        session_id = request.match_info["id"]
        if session_id not in self.sessions:
            return web.Response(status=404, text="No such checkout session")
        if self.sessions[session_id]["status"] != "open":
            return self._session_gone(self.sessions[session_id])
        deliveries = self._pay(session_id)
        await asyncio.get_running_loop().run_in_executor(None, self._send, deliveries)
        url = str(self.sessions[session_id]["success_url"]).replace(
            "{CHECKOUT_SESSION_ID}", session_id
        )
        raise web.HTTPSeeOther(url)

    @staticmethod
    def _session_gone(session: dict[str, Any]) -> web.Response:
        """Stripe's hosted page for a session that is expired or already paid: no Pay button."""
        state = "expired" if session["status"] == "expired" else "already paid"
        page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>Checkout</title>
</head><body><main><h1 id="gone">This checkout session is {state}</h1>
<p>Return to the site and start again.</p></main></body></html>"""
        return web.Response(status=410, text=page, content_type="text/html")

    async def portal_page(self, request: web.Request) -> web.Response:
        session = self.portal_sessions.get(request.match_info["id"])
        if session is None:
            return web.Response(status=404, text="No such portal session")
        rows = []
        for sub in self._subscriptions_of(session["customer"]):
            item = sub["items"]["data"][0]
            state = (
                "Cancels at period end"
                if sub["cancel_at_period_end"]
                else sub["status"].replace("_", " ")
            )
            action = (
                f'<form method="post" action="/p/session/{session["id"]}/cancel">'
                f'<input type="hidden" name="subscription" value="{sub["id"]}">'
                '<button type="submit" id="cancel">Cancel plan</button></form>'
                if sub["status"] in ("active", "trialing", "past_due")
                and not sub["cancel_at_period_end"]
                else ""
            )
            rows.append(f"<li>{html.escape(str(item['price']['nickname']))}: {state}{action}</li>")
        page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>Billing</title></head>
<body><h1>Fake customer portal</h1><ul>{"".join(rows)}</ul>
<a href="{html.escape(session["return_url"] or "")}">Return</a></body></html>"""
        return web.Response(text=page, content_type="text/html")

    async def portal_cancel(self, request: web.Request) -> web.Response:
        session = self.portal_sessions.get(request.match_info["id"])
        form = await request.post()
        sub = self.subscriptions.get(str(form.get("subscription", "")))
        if session is None or sub is None or sub["customer"] != session["customer"]:
            return web.Response(status=404, text="No such subscription")
        deliveries = self._cancel_at_period_end(sub["id"])
        await asyncio.get_running_loop().run_in_executor(None, self._send, deliveries)
        raise web.HTTPSeeOther(session["return_url"] or "/")

    # --- what happens at Stripe ------------------------------------------------------------
    def pay(self, session_id: str) -> str:
        """Pay a Checkout Session, as its Pay button does; return the new subscription's id.
        Raises ValueError for a session that is not open (expired, or paid): its page refuses."""
        if self.sessions[session_id]["status"] != "open":
            raise ValueError(
                f"checkout session {session_id} is {self.sessions[session_id]['status']}"
            )
        self._send(self._pay(session_id))
        return str(self.sessions[session_id]["subscription"])

    def cancel_at_period_end(self, subscription_id: str) -> None:
        """Cancel at period end, as the portal's "Cancel plan" button does."""
        self._send(self._cancel_at_period_end(subscription_id))

    def end_period(self, subscription_id: str) -> None:
        """The period ends: a subscription set to cancel is deleted; any other renews, paid."""
        with self._lock:
            sub = self.subscriptions[subscription_id]
            now = int(time.time())
            if sub["cancel_at_period_end"]:
                sub.update(status="canceled", ended_at=now, canceled_at=sub["canceled_at"] or now)
                deliveries = [self._event("customer.subscription.deleted", sub)]
            else:
                item = sub["items"]["data"][0]
                item["current_period_start"] = item["current_period_end"]
                item["current_period_end"] = item["current_period_start"] + PERIOD
                invoice = self._invoice(sub, paid=True, reason="subscription_cycle")
                deliveries = [
                    self._event("invoice.paid", invoice),
                    self._event("customer.subscription.updated", sub),
                ]
        self._send(deliveries)

    def fail_payment(self, subscription_id: str) -> str:
        """A renewal's charge fails: the invoice stays open and the subscription is past_due.
        Return the invoice's id."""
        with self._lock:
            sub = self.subscriptions[subscription_id]
            invoice = self._invoice(sub, paid=False, reason="subscription_cycle")
            previous = {"status": sub["status"]}
            sub["status"] = "past_due"
            deliveries = [
                self._event("invoice.payment_failed", invoice),
                self._event("customer.subscription.updated", sub, previous),
            ]
        self._send(deliveries)
        return str(invoice["id"])

    def pay_invoice(self, invoice_id: str) -> None:
        """A retried charge succeeds: the invoice is paid and the subscription active again."""
        with self._lock:
            invoice = self.invoices[invoice_id]
            invoice.update(status="paid", amount_paid=invoice["amount_due"], amount_remaining=0)
            sub = self.subscriptions[invoice["parent"]["subscription_details"]["subscription"]]
            previous = {"status": sub["status"]}
            sub["status"] = "active"
            deliveries = [
                self._event("invoice.paid", invoice),
                self._event("customer.subscription.updated", sub, previous),
            ]
        self._send(deliveries)

    def resend(self, event_id: str) -> Delivery:
        """Send an event again (Stripe retries a webhook it thinks failed), newly signed."""
        with self._lock:
            event = next(e for e in self.events if e["id"] == event_id)
        delivery = self._sign(event)
        self._send([delivery])
        return delivery

    def take(self, event_type: str | None = None) -> list[Delivery]:
        """Remove and return the waiting webhooks (of one type, or all), oldest first."""
        with self._lock:
            taken = [d for d in self.outbox if event_type in (None, d.type)]
            self.outbox = [d for d in self.outbox if d not in taken]
        return taken

    def _subscriptions_of(self, customer_id: str) -> list[dict[str, Any]]:
        return [s for s in self.subscriptions.values() if s["customer"] == customer_id]

    def _pay(self, session_id: str) -> list[Delivery]:
        with self._lock:
            session = self.sessions[session_id]
            if session["status"] != "open":
                return []
            if not session["customer"]:
                session["customer"] = self.api_create_customer(
                    None,  # type: ignore[arg-type]
                    {"email": session["customer_email"]},
                )["id"]
            now = int(time.time())
            sub_id = _new_id("sub")
            sub = {
                "id": sub_id,
                "object": "subscription",
                "billing_cycle_anchor": now,
                "cancel_at": None,
                "cancel_at_period_end": False,
                "canceled_at": None,
                "cancellation_details": {"comment": None, "feedback": None, "reason": None},
                "collection_method": "charge_automatically",
                "created": now,
                "currency": "usd",
                "customer": session["customer"],
                "ended_at": None,
                "items": {
                    "object": "list",
                    "data": [
                        {
                            "id": _new_id("si"),
                            "object": "subscription_item",
                            "created": now,
                            "current_period_end": now + PERIOD,
                            "current_period_start": now,
                            "metadata": {},
                            "price": self.prices[session["_price"]],
                            "quantity": 1,
                            "subscription": sub_id,
                        }
                    ],
                    "has_more": False,
                    "total_count": 1,
                    "url": f"/v1/subscription_items?subscription={sub_id}",
                },
                "latest_invoice": None,
                "livemode": False,
                "metadata": session["_subscription_metadata"],
                "start_date": now,
                "status": "active",
                "trial_end": None,
                "trial_start": None,
            }
            self.subscriptions[sub_id] = sub
            invoice = self._invoice(sub, paid=True, reason="subscription_create")
            session.update(
                status="complete",
                payment_status="paid",
                subscription=sub_id,
                invoice=invoice["id"],
            )
            return [
                self._event("customer.subscription.created", sub),
                self._event("invoice.paid", invoice),
                self._event("invoice.payment_succeeded", invoice),
                self._event("checkout.session.completed", self._public(session)),
            ]

    def _cancel_at_period_end(self, subscription_id: str) -> list[Delivery]:
        with self._lock:
            sub = self.subscriptions[subscription_id]
            previous = {
                "cancel_at": sub["cancel_at"],
                "cancel_at_period_end": sub["cancel_at_period_end"],
                "canceled_at": sub["canceled_at"],
            }
            now = int(time.time())
            sub.update(
                cancel_at=sub["items"]["data"][0]["current_period_end"],
                cancel_at_period_end=True,
                canceled_at=now,
                cancellation_details={
                    "comment": None,
                    "feedback": None,
                    "reason": "cancellation_requested",
                },
            )
            return [self._event("customer.subscription.updated", sub, previous)]

    def _invoice(self, sub: dict[str, Any], *, paid: bool, reason: str) -> dict[str, Any]:
        item = sub["items"]["data"][0]
        amount = item["price"]["unit_amount"]
        now = int(time.time())
        invoice = {
            "id": _new_id("in"),
            "object": "invoice",
            "amount_due": amount,
            "amount_paid": amount if paid else 0,
            "amount_remaining": 0 if paid else amount,
            "attempt_count": 1,
            "attempted": True,
            "billing_reason": reason,
            "collection_method": "charge_automatically",
            "created": now,
            "currency": "usd",
            "customer": sub["customer"],
            "livemode": False,
            "next_payment_attempt": None if paid else now + 3 * 24 * 3600,
            "parent": {
                "quote_details": None,
                "subscription_details": {"metadata": sub["metadata"], "subscription": sub["id"]},
                "type": "subscription_details",
            },
            "period_end": item["current_period_end"],
            "period_start": item["current_period_start"],
            "status": "paid" if paid else "open",
            "total": amount,
        }
        self.invoices[invoice["id"]] = invoice
        sub["latest_invoice"] = invoice["id"]
        return invoice

    def _event(
        self, event_type: str, obj: dict[str, Any], previous: dict[str, Any] | None = None
    ) -> Delivery:
        data: dict[str, Any] = {"object": json.loads(json.dumps(obj))}
        if previous is not None:
            data["previous_attributes"] = previous
        event = {
            "id": _new_id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()),
            "data": data,
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }
        self.events.append(event)
        return self._sign(event)

    def _sign(self, event: dict[str, Any]) -> Delivery:
        payload = json.dumps(event, indent=2)
        header = stripe.WebhookSignature.generate_signature_header(
            payload, self.webhook_secret, int(time.time())
        )
        return Delivery(event, payload, header)

    def _send(self, deliveries: list[Delivery]) -> None:
        """POST each webhook to ``webhook_url`` in order, or queue them in ``outbox``."""
        url = self.webhook_url
        if url is None:
            with self._lock:
                self.outbox.extend(deliveries)
            return
        with httpx.Client(timeout=30) as client:
            for delivery in deliveries:
                response = client.post(
                    url,
                    content=delivery.payload.encode(),
                    headers={
                        "Content-Type": "application/json; charset=utf-8",
                        "Stripe-Signature": delivery.signature,
                        "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                    },
                )
                with self._lock:
                    self.delivered.append((delivery, response.status_code))
