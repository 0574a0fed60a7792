from datetime import timedelta

from django.db import migrations

PLANS = [
    {"slug": "free", "name": "Free", "is_default": True, "sleeps": True,
     "sleep_after": timedelta(minutes=15), "monthly_token_quota": 1_000_000,
     "requests_per_minute": 20, "memory_mb": 1536, "cpu_millis": 1000, "pids_max": 512,
     "internet": False, "max_sandboxes": 1},
    {"slug": "pro", "name": "Pro", "is_default": False, "sleeps": False, "sleep_after": None,
     "monthly_token_quota": 20_000_000, "requests_per_minute": 120, "memory_mb": 2048,
     "cpu_millis": 2000, "pids_max": 1024, "internet": True, "max_sandboxes": 3},
]


def seed(apps, schema_editor):
    Plan = apps.get_model("billing", "Plan")
    for fields in PLANS:
        Plan.objects.get_or_create(slug=fields["slug"], defaults=fields)


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
