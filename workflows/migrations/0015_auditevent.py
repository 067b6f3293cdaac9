"""AuditEvent, moved here from diagnostics with its table (diagnostics_auditevent), and a
new action: start_run (refused run starts are audited)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("workflows", "0014_pool_timeout"),
        ("diagnostics", "0007_auditevent_moved_to_workflows"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="AuditEvent",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        ("actor", models.CharField(help_text="Username of who acted.", max_length=150)),
                        (
                            "action",
                            models.CharField(
                                choices=[
                                    ("clear_queue", "Clear Queue"),
                                    ("requeue_failed", "Requeue Failed"),
                                ],
                                max_length=32,
                            ),
                        ),
                        (
                            "target",
                            models.CharField(
                                help_text="What was acted on, e.g. queue:default.", max_length=200
                            ),
                        ),
                        ("reason", models.TextField()),
                        ("before", models.JSONField(blank=True, default=dict)),
                        ("after", models.JSONField(blank=True, default=dict)),
                        ("at", models.DateTimeField(auto_now_add=True)),
                    ],
                    options={
                        "db_table": "diagnostics_auditevent",
                        "ordering": ["-at", "-id"],
                        "indexes": [models.Index(fields=["target", "-at"], name="auditevent_target_at")],
                        "constraints": [
                            models.CheckConstraint(
                                condition=models.Q(("action__in", ["clear_queue", "requeue_failed"])),
                                name="auditevent_action_valid",
                            )
                        ],
                    },
                )
            ]
        ),
        migrations.AlterField(
            model_name="auditevent",
            name="action",
            field=models.CharField(
                choices=[
                    ("start_run", "Start Run"),
                    ("clear_queue", "Clear Queue"),
                    ("requeue_failed", "Requeue Failed"),
                ],
                max_length=32,
            ),
        ),
        migrations.RemoveConstraint(model_name="auditevent", name="auditevent_action_valid"),
        migrations.AddConstraint(
            model_name="auditevent",
            constraint=models.CheckConstraint(
                condition=models.Q(("action__in", ["start_run", "clear_queue", "requeue_failed"])),
                name="auditevent_action_valid",
            ),
        ),
    ]
