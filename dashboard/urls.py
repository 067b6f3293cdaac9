from django.urls import path

from dashboard import (
    action_views,
    bulk_views,
    deployment_views,
    diagnostics_views,
    log_views,
    views,
    worker_views,
)

app_name = "dashboard"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("workflows/", views.workflow_list, name="workflow-list"),
    # Outside workflows/: any slug, "upload" too, can name a workflow.
    path("definitions/upload/", deployment_views.upload, name="workflow-upload"),
    path("workflows/<slug:slug>/", views.workflow_detail, name="workflow-detail"),
    path("workflows/<slug:slug>/diff/", views.workflow_diff, name="workflow-diff"),
    path("workflows/<slug:slug>/start/", action_views.start_run, name="workflow-start"),
    path("workflows/<slug:slug>/deploy/", deployment_views.deploy, name="workflow-deploy"),
    path(
        "workflows/<slug:slug>/release/",
        deployment_views.release_status,
        name="workflow-release",
    ),
    path(
        "workflows/<slug:slug>/rollback-version/",
        deployment_views.rollback_preview,
        name="workflow-rollback-preview",
    ),
    path(
        "workflows/<slug:slug>/rollback-version/apply/",
        deployment_views.rollback,
        name="workflow-rollback",
    ),
    path(
        "workflows/<slug:slug>/versions/<int:number>/runs-left/",
        deployment_views.runs_left,
        name="workflow-version-runs-left",
    ),
    path(
        "deployments/<int:deployment_id>/promote/",
        deployment_views.promote,
        name="deployment-promote",
    ),
    path("deployments/<int:deployment_id>/abort/", deployment_views.abort, name="deployment-abort"),
    path("runs/", views.run_list, name="run-list"),
    path("runs/bulk/", bulk_views.preview, name="runs-bulk-preview"),
    path("runs/bulk/apply/", bulk_views.apply, name="runs-bulk"),
    path("runs/<int:run_id>/", views.run_detail, name="run-detail"),
    path("runs/<int:run_id>/live/", views.run_live, name="run-live"),
    path("logs/", log_views.logs, name="logs"),
    path(
        "runs/<int:run_id>/nodes/<str:node_key>/attempts/<int:number>/log.txt",
        log_views.attempt_log_download,
        name="attempt-log-download",
    ),
    path(
        "runs/<int:run_id>/nodes/<str:node_key>/attempts/<int:number>/log/tail/",
        log_views.attempt_log_tail,
        name="attempt-log-tail",
    ),
    path("findings/", diagnostics_views.findings, name="findings"),
    path("system/", diagnostics_views.system_report_page, name="system-report"),
    path("workers/", worker_views.workers, name="workers"),
    path("system/queues/<str:queue>/clear/", diagnostics_views.clear_queue, name="clear-queue"),
    path(
        "system/queues/<str:queue>/requeue-failed/",
        diagnostics_views.requeue_failed,
        name="requeue-failed",
    ),
]

# Each operator action: a preview page to confirm it (GET), and the action itself (POST).
for slug in action_views.ACTIONS:
    urlpatterns += [
        path(
            f"runs/<int:run_id>/{slug}/preview/",
            action_views.preview,
            {"action": slug},
            name=f"run-{slug}-preview",
        ),
        path(f"runs/<int:run_id>/{slug}/", action_views.act, {"action": slug}, name=f"run-{slug}"),
    ]
