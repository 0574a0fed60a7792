from datetime import timedelta

from django.db import migrations

# A frozen copy of the standard plans' backup fields at this point.
BACKUPS = {
    "free": {
        "backup_interval": timedelta(days=1),
        "backup_keep_last": 0,
        "backup_keep_daily": 7,
        "backup_keep_weekly": 0,
    },
    "pro": {
        "backup_interval": timedelta(hours=1),
        "backup_keep_last": 24,
        "backup_keep_daily": 7,
        "backup_keep_weekly": 4,
    },
}


def set_backups(apps, schema_editor):
    Plan = apps.get_model("billing", "Plan")
    for slug, fields in BACKUPS.items():
        Plan.objects.filter(slug=slug).update(**fields)


class Migration(migrations.Migration):
    dependencies = [("billing", "0005_plan_backups")]
    operations = [migrations.RunPython(set_backups, migrations.RunPython.noop)]
