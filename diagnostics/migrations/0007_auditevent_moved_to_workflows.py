"""AuditEvent moved to workflows (it audits refused run starts too): the table stays where
it is, only Django's idea of which app owns it changes. The operate_queues permission it
carried moves to Finding, keeping its id, so every grant of it still holds."""

from django.db import migrations


def move_permission(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    old = ContentType.objects.filter(app_label="diagnostics", model="auditevent").first()
    if old is None:
        return  # a new database: the permission is created for Finding after migrating
    new, _ = ContentType.objects.get_or_create(app_label="diagnostics", model="finding")
    Permission.objects.filter(content_type=old, codename="operate_queues").update(content_type=new)


class Migration(migrations.Migration):
    dependencies = [
        ("diagnostics", "0006_finding_began_at"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(state_operations=[migrations.DeleteModel("AuditEvent")]),
        migrations.AlterModelOptions(
            name="finding",
            options={
                "ordering": ["-last_seen", "-id"],
                "permissions": [("operate_queues", "Can clear queues and requeue failed jobs")],
            },
        ),
        migrations.RunPython(move_permission, migrations.RunPython.noop),
    ]
