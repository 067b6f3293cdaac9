from django.db import migrations, models
from django.db.models import F


def failed_runs_failed_when_they_finished(apps, schema_editor):
    """Runs already failed failed when they finished; resumed ones are not known anymore."""
    Run = apps.get_model("workflows", "Run")
    Run.objects.filter(status="failed").update(first_failed_at=F("finished_at"))


class Migration(migrations.Migration):
    dependencies = [
        ("workflows", "0011_api_token_expiry"),
    ]

    operations = [
        migrations.AddField(
            model_name="run",
            name="first_failed_at",
            field=models.DateTimeField(
                blank=True, help_text="When the run first failed (kept after a resume).", null=True
            ),
        ),
        migrations.RunPython(failed_runs_failed_when_they_finished, migrations.RunPython.noop),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(
                condition=models.Q(("first_failed_at__isnull", False)),
                fields=["workflow", "first_failed_at"],
                name="run_workflow_failed",
            ),
        ),
        migrations.AddIndex(
            model_name="run",
            index=models.Index(
                condition=models.Q(("status", "succeeded")),
                fields=["workflow", "finished_at"],
                name="run_workflow_succeeded",
            ),
        ),
    ]
