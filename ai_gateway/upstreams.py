"""Choosing where a model call goes: staff routes, operator upstreams, the user's own key.

Order: the first ``ModelRoute`` (by priority) whose pattern matches the model and whose upstream
speaks the call's API; else the first enabled operator ``Upstream`` for that API; else the
operator upstream configured in settings (HERMIT_OPENAI_API_KEY / HERMIT_ANTHROPIC_API_KEY with
their base URLs). A matching route's fallback, if any, is the second target. Disabled
upstreams are never used. When the user has saved a key for a target's provider (BYOK) and the
target's upstream accepts user keys, the user's key replaces the operator's for that target.

``check_user_key`` asks the provider whether a user's key is good (a free model listing), before
it is saved.
"""

from __future__ import annotations

import fnmatch
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.conf import settings

from ai_gateway.models import Api, ModelRoute, Price, Provider, Upstream, UserProviderKey

GLOB_CHARS = set("*?[")
TABLE_TTL = 30.0  # seconds; saves in this process invalidate at once (see apps.ready)


@dataclass(frozen=True)
class RoutingTable:
    """A read-only snapshot of routes, operator upstreams and prices, shared by all calls."""

    routes: list[ModelRoute]
    operators: list[Upstream]
    prices: dict[str, Price]
    loaded_at: float = field(default_factory=time.monotonic)


_table: RoutingTable | None = None
_table_lock = threading.Lock()


def routing_table() -> RoutingTable:
    """Return the current snapshot, reloading it when older than TABLE_TTL or invalidated."""
    global _table
    table = _table
    if table is not None and time.monotonic() - table.loaded_at < TABLE_TTL:
        return table
    with _table_lock:
        table = _table  # another thread may have loaded it while this one waited
        if table is not None and time.monotonic() - table.loaded_at < TABLE_TTL:
            return table
        routes = list(ModelRoute.objects.select_related("upstream", "fallback"))
        operators = list(Upstream.objects.filter(is_operator=True, enabled=True).order_by("id"))
        prices = {p.model: p for p in Price.objects.all()}
        _table = RoutingTable(routes, operators, prices)
        return _table


def invalidate_routing_table(**kwargs: Any) -> None:
    """Signal receiver: drop the snapshot after staff change a route, upstream or price."""
    global _table
    _table = None


@dataclass(frozen=True)
class Target:
    """One upstream attempt. ``api_key`` is a secret: never log or repr it."""

    upstream_id: int | None  # None for the settings-defined operator upstream
    name: str
    provider: str
    base_url: str
    api_key: str
    model: str  # the model name sent upstream
    timeout: float
    byok: bool

    def __repr__(self) -> str:
        return f"Target({self.name!r}, model={self.model!r}, byok={self.byok})"

    def url(self, api: str) -> str:
        base = self.base_url.rstrip("/")
        return f"{base}/v1/messages" if api == Api.ANTHROPIC else f"{base}/chat/completions"


def _speaks(upstream: Upstream, api: str) -> bool:
    return upstream.enabled and upstream.api == api


def _target(upstream: Upstream, model: str, keys: dict[str, str]) -> Target:
    user_key = keys.get(upstream.key_provider()) if upstream.accepts_user_keys else None
    return Target(
        upstream_id=upstream.pk,
        name=upstream.name,
        provider=str(upstream.provider),
        base_url=upstream.base_url,
        api_key=user_key or upstream.api_key or "",
        model=model,
        timeout=upstream.timeout_seconds,
        byok=bool(user_key),
    )


def settings_upstream(api: str) -> Upstream | None:
    """Return an unsaved Upstream for the operator key in settings, or None if not set."""
    if api == Api.ANTHROPIC:
        key = getattr(settings, "HERMIT_ANTHROPIC_API_KEY", "")
        base = getattr(settings, "HERMIT_ANTHROPIC_BASE_URL", "") or "https://api.anthropic.com"
        provider = Provider.ANTHROPIC
    else:
        key = getattr(settings, "HERMIT_OPENAI_API_KEY", "")
        base = getattr(settings, "HERMIT_OPENAI_BASE_URL", "") or "https://api.openai.com/v1"
        provider = Provider.OPENAI
    if not key:
        return None
    # The provider's own API checks users' keys; an OpenAI-compatible server elsewhere may not.
    official = urlsplit(base).hostname in OFFICIAL_HOSTS
    return Upstream(name=f"settings:{provider}", provider=provider, base_url=base, api_key=key,
                    accepts_user_keys=official)  # fmt: skip


OFFICIAL_HOSTS = {"api.openai.com", "api.anthropic.com"}


def choose_targets(user_id: int, api: str, model: str,
                   keys: dict[str, str] | None = None) -> list[Target]:  # fmt: skip
    """Return the upstream attempts for this call, primary first; empty if none is configured.

    ``keys`` are the user's own provider keys (read from the database when not given).
    """
    if keys is None:
        keys = {k.provider: k.api_key for k in UserProviderKey.objects.filter(user_id=user_id)}
    table = routing_table()
    for route in table.routes:
        if not (route.matches(model) and _speaks(route.upstream, api)):
            continue
        targets = [_target(route.upstream, route.upstream_model or model, keys)]
        if route.fallback is not None and _speaks(route.fallback, api):
            targets.append(_target(route.fallback, route.fallback_model or model, keys))
        return targets
    operator = [u for u in table.operators if u.api == api]
    if operator:
        return [_target(operator[0], model, keys)]
    fallback = settings_upstream(api)
    return [_target(fallback, model, keys)] if fallback is not None else []


def listed_models() -> list[str]:
    """Return the model names the gateway advertises (exact routes and priced models)."""
    table = routing_table()
    names = {r.pattern for r in table.routes} | set(table.prices)
    names.add(settings.HERMIT_DEFAULT_MODEL)
    return sorted(n for n in names if not GLOB_CHARS & set(n))


def price_for(target: Target, requested: str) -> Price | None:
    """Return the price of a call to ``target``: of the model sent upstream, else requested."""
    return find_price(target.model) or find_price(requested)


def user_key_upstream(provider: str) -> Upstream | None:
    """Return the upstream a user's key for ``provider`` would be checked against and used on."""
    upstream = (
        Upstream.objects.filter(provider=provider, enabled=True, accepts_user_keys=True)
        .order_by("-is_operator", "id")
        .first()
    )
    if upstream is not None:
        return upstream
    for api in (Api.OPENAI, Api.ANTHROPIC):
        fallback = settings_upstream(api)
        if fallback is not None and fallback.provider == provider and fallback.accepts_user_keys:
            return fallback
    return None


def check_user_key(provider: str, key: str) -> str:
    """Ask the provider whether ``key`` works (a model listing, free); return "" or the problem."""
    upstream = user_key_upstream(provider)
    if upstream is None:
        return "Hermit has no upstream for this provider that takes your own keys."
    base = upstream.base_url.rstrip("/")
    if upstream.api == Api.ANTHROPIC:
        url, headers = f"{base}/v1/models", {"x-api-key": key, "anthropic-version": "2023-06-01"}
    else:
        url, headers = f"{base}/models", {"authorization": f"Bearer {key}"}
    try:
        with httpx.Client(timeout=10, trust_env=False, follow_redirects=False) as http:
            response = http.get(url, headers=headers)
    except httpx.HTTPError as exc:
        return f"Could not reach {upstream.name} to check the key ({type(exc).__name__})."
    if response.status_code in (401, 403):
        return f"{upstream.name} refused this key ({response.status_code}): check it and retry."
    if response.status_code != 200:
        return f"{upstream.name} answered {response.status_code} when checking the key."
    return ""


def find_price(model: str) -> Price | None:
    """Return the exact price entry for ``model``, else the longest glob matching it, or None."""
    prices = routing_table().prices
    if model in prices:
        return prices[model]
    globs = [p for p in prices if GLOB_CHARS & set(p) and fnmatch.fnmatchcase(model, p)]
    return prices[max(globs, key=len)] if globs else None
