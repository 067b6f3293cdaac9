from django.db import migrations, models


class Migration(migrations.Migration):
    """Indexes for search: logs by time window, runs by an attempt's error text."""

    dependencies = [
        ("workflows", "0012_run_first_failed_at"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="logline",
            index=models.Index(fields=["at", "id"], name="logline_at"),
        ),
        migrations.AddIndex(
            model_name="nodeattempt",
            index=models.Index(
                condition=models.Q(("error_type", ""), _negated=True),
                fields=["node_run"],
                name="attempt_error",
            ),
        ),
    ]
