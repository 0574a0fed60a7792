"""The AI gateway's data: upstreams, routes, prices, sandbox credentials, BYOK keys, usage.

Token accounting convention (both providers): ``input_tokens`` counts every prompt token,
cached or not; ``cached_tokens`` is the part of it served from the provider's prompt cache;
``output_tokens`` counts generated tokens. Cost is priced per million tokens from ``Price``.
"""

from __future__ import annotations

import fnmatch
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.utils import timezone

from portal.lib.fields import EncryptedTextField


class Provider(models.TextChoices):
    OPENAI = "openai", "OpenAI"
    ANTHROPIC = "anthropic", "Anthropic"
    OPENAI_COMPATIBLE = "openai-compatible", "OpenAI-compatible (Ollama, vLLM, ...)"


class Api(models.TextChoices):
    """The wire format a call uses."""

    OPENAI = "openai", "OpenAI Chat Completions"
    ANTHROPIC = "anthropic", "Anthropic Messages"


class Upstream(models.Model):
    """A model provider endpoint the gateway forwards to, with the operator's key for it."""

    name = models.CharField(max_length=100, unique=True)
    provider = models.CharField(max_length=20, choices=Provider.choices)
    base_url = models.URLField(
        help_text="OpenAI-style: up to /v1 (https://api.openai.com/v1, http://host:11434/v1). "
        "Anthropic: the origin (https://api.anthropic.com)."
    )
    api_key = EncryptedTextField(blank=True, help_text="The operator's key; stored encrypted.")
    is_operator = models.BooleanField(
        default=True,
        help_text="Used by default for its API when no route matches a model.",
    )
    enabled = models.BooleanField(default=True)
    accepts_user_keys = models.BooleanField(
        default=False,
        help_text="Users' own keys (BYOK) for this provider replace the operator key here. Turn "
        "on only for an upstream that really checks keys (OpenAI, Anthropic): on one that "
        "ignores them, a made-up key would mean free, unmetered use.",
    )
    timeout_seconds = models.FloatField(
        default=120.0, help_text="Longest wait for the response to start, and between chunks."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_provider_display()})"

    @property
    def api(self) -> str:
        """Return the wire format this upstream speaks (an ``Api`` value)."""
        return Api.ANTHROPIC if self.provider == Provider.ANTHROPIC else Api.OPENAI

    def key_provider(self) -> str:
        """Return the provider whose user keys (BYOK) may replace the operator key here."""
        return str(self.provider)


class ModelRoute(models.Model):
    """Staff's map from requested model names to upstreams, with an optional fallback."""

    pattern = models.CharField(
        max_length=200, help_text="Model name or glob, e.g. 'gpt-4o-mini' or 'claude-*'."
    )
    upstream = models.ForeignKey(Upstream, on_delete=models.CASCADE, related_name="routes")
    upstream_model = models.CharField(
        max_length=200, blank=True, help_text="Send this model name upstream instead (optional)."
    )
    fallback = models.ForeignKey(
        Upstream,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="fallback_routes",
        help_text="Tried once when the upstream answers 5xx, times out or is unreachable.",
    )
    fallback_model = models.CharField(max_length=200, blank=True)
    priority = models.IntegerField(default=100, help_text="Lower numbers are tried first.")

    class Meta:
        ordering = ["priority", "id"]

    def __str__(self) -> str:
        return f"{self.pattern} → {self.upstream.name}"

    def matches(self, model: str) -> bool:
        return fnmatch.fnmatchcase(model, self.pattern)


class Price(models.Model):
    """What one million tokens of a model cost. Staff edit these in the admin."""

    model = models.CharField(
        max_length=200, unique=True, help_text="Model name or glob ('claude-*'); exact wins."
    )
    input_per_million = models.DecimalField(max_digits=12, decimal_places=4, default=Decimal(0))
    cached_input_per_million = models.DecimalField(
        max_digits=12, decimal_places=4, default=Decimal(0)
    )
    output_per_million = models.DecimalField(max_digits=12, decimal_places=4, default=Decimal(0))
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model"]

    def __str__(self) -> str:
        return self.model

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int) -> Decimal:
        """Return the cost of one call; cached tokens are a part of ``input_tokens``."""
        uncached = max(0, input_tokens - cached_tokens)
        total = (
            uncached * self.input_per_million
            + cached_tokens * self.cached_input_per_million
            + output_tokens * self.output_per_million
        )
        return (total / Decimal(1_000_000)).quantize(Decimal("0.000001"))


class SandboxCredential(models.Model):
    """The key one sandbox presents to the gateway. Only its SHA-256 is stored."""

    sandbox = models.OneToOneField(
        "sandboxes.Sandbox", on_delete=models.CASCADE, related_name="ai_credential"
    )
    key_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=16, help_text="The first characters, to recognise it.")
    created_at = models.DateTimeField(auto_now_add=True)
    rotated_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… for sandbox {self.sandbox_id}"


class UserProviderKey(models.Model):
    """A user's own provider key (BYOK), used instead of the operator's for that provider."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="provider_keys"
    )
    provider = models.CharField(max_length=20, choices=Provider.choices)
    api_key = EncryptedTextField()
    hint = models.CharField(max_length=24, help_text="Masked form shown after saving.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "provider"], name="one_key_per_provider")
        ]

    def __str__(self) -> str:
        return f"{self.user} {self.provider} {self.hint}"

    @staticmethod
    def mask(key: str) -> str:
        """Return a display form that shows at most the first 3 and last 4 characters."""
        if len(key) <= 12:
            return "…" + key[-2:]
        return f"{key[:3]}…{key[-4:]}"


class SpendCounter(models.Model):
    """One user's model spend in one calendar month, as the quota sees it (no Redis).

    ``used_*`` is what finished calls cost (micro-USD) and used (tokens), operator-paid only;
    ``reserved_*`` and ``in_flight`` are held by calls under way, as a lease that lapses at
    ``lease_until`` (see ai_gateway.limits).
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="ai_spend"
    )
    month = models.DateField(help_text="The first day of the month (UTC).")
    used_cost = models.BigIntegerField(default=0, help_text="Micro-USD.")
    used_tokens = models.BigIntegerField(default=0)
    reserved_cost = models.BigIntegerField(default=0, help_text="Micro-USD.")
    reserved_tokens = models.BigIntegerField(default=0)
    in_flight = models.IntegerField(default=0)
    lease_until = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "month"], name="one_spend_counter_a_month")
        ]

    def __str__(self) -> str:
        return f"{self.user_id} {self.month:%Y-%m}"


class UsageRecord(models.Model):
    """One model call through the gateway, whatever its outcome."""

    class Outcome(models.TextChoices):
        OK = "ok", "OK"
        ERROR = "error", "Error"
        CANCELLED = "cancelled", "Cancelled by the client"
        REFUSED = "refused", "Refused by the gateway"

    created_at = models.DateTimeField(default=timezone.now)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="ai_usage",
        help_text="Empty when the credential was not recognised.",
    )
    sandbox = models.ForeignKey(
        "sandboxes.Sandbox", on_delete=models.SET_NULL, null=True, blank=True
    )
    upstream = models.ForeignKey(Upstream, on_delete=models.SET_NULL, null=True, blank=True)
    api = models.CharField(max_length=20, choices=Api.choices)
    model = models.CharField(max_length=200, blank=True)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal(0))
    latency_ms = models.PositiveIntegerField(default=0)
    ttfb_ms = models.PositiveIntegerField(null=True, blank=True)
    status_code = models.PositiveSmallIntegerField(default=0)
    outcome = models.CharField(max_length=10, choices=Outcome.choices)
    byok = models.BooleanField(default=False, help_text="Paid with the user's own key.")
    fallback_used = models.BooleanField(default=False)
    error = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ["-created_at"]
        # by user for quotas and usage pages; by time alone for /metrics' window
        indexes = [models.Index(fields=["user", "created_at"]), models.Index(fields=["created_at"])]

    def __str__(self) -> str:
        return f"{self.model} {self.outcome} {self.input_tokens}+{self.output_tokens}"

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens
