"""Seed the price table with the default models, so operator keys serve them out of the box.

Staff edit or delete these rows in the admin (AI gateway → Prices); a model without a price is
not served on the operator's keys. USD per million tokens, list prices (standard tier) as
published on https://platform.openai.com/docs/pricing and
https://docs.anthropic.com/en/docs/about-claude/pricing (Anthropic: "cache hits" for the cached
input price; cache writes are billed there at 1.25x input, priced here as plain input).
"""

from decimal import Decimal

from django.db import migrations

# model: (input, cached input, output), USD per million tokens. A frozen copy: never edit a
# migration's data; add a new migration (or edit the rows in the admin) when prices change.
PRICES = {
    "gpt-4o-mini": ("0.15", "0.075", "0.60"),
    "gpt-4o": ("2.50", "1.25", "10.00"),
    "gpt-4.1": ("2.00", "0.50", "8.00"),
    "gpt-4.1-mini": ("0.40", "0.10", "1.60"),
    "gpt-4.1-nano": ("0.10", "0.025", "0.40"),
    "gpt-5": ("1.25", "0.125", "10.00"),
    "gpt-5-mini": ("0.25", "0.025", "2.00"),
    "gpt-5-nano": ("0.05", "0.005", "0.40"),
    "claude-sonnet-4-5": ("3.00", "0.30", "15.00"),
    "claude-sonnet-4-5-20250929": ("3.00", "0.30", "15.00"),
    "claude-haiku-4-5": ("1.00", "0.10", "5.00"),
    "claude-haiku-4-5-20251001": ("1.00", "0.10", "5.00"),
    "claude-opus-4-5": ("5.00", "0.50", "25.00"),
    "claude-opus-4-5-20251101": ("5.00", "0.50", "25.00"),
}


def seed(apps, schema_editor):
    Price = apps.get_model("ai_gateway", "Price")
    for model, (inp, cached, out) in PRICES.items():
        Price.objects.get_or_create(
            model=model,
            defaults={
                "input_per_million": Decimal(inp),
                "cached_input_per_million": Decimal(cached),
                "output_per_million": Decimal(out),
            },
        )


class Migration(migrations.Migration):
    dependencies = [("ai_gateway", "0002_accepts_user_keys_spend_counter")]

    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
