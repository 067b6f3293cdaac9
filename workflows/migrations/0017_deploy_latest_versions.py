"""Every workflow loaded before deployments existed gets one: its latest version,
active, as loading made it live for every new run until now."""

from django.db import migrations


def deploy_latest_versions(apps, schema_editor):
    Workflow = apps.get_model("workflows", "Workflow")
    Deployment = apps.get_model("workflows", "Deployment")
    for workflow in Workflow.objects.all().iterator():
        latest = workflow.versions.order_by("-number").first()
        if latest is None or Deployment.objects.filter(workflow=workflow).exists():
            continue
        Deployment.objects.create(
            workflow=workflow,
            version=latest,
            strategy="immediate",
            state="active",
            actor="migration",
            reason="the latest version when deployments began",
        )


class Migration(migrations.Migration):
    dependencies = [("workflows", "0016_deployments")]

    operations = [migrations.RunPython(deploy_latest_versions, migrations.RunPython.noop)]
