"""Routes of the JSON API, mounted at /api/v1/ (see docs/api.md)."""

from django.urls import path, re_path

from workflows.api import views

app_name = "api"

urlpatterns = [
    path("openapi.json", views.openapi_document, name="openapi"),
    path("workflows", views.workflow_list, name="workflow-list"),
    path("workflows/<str:slug>", views.workflow_detail, name="workflow-detail"),
    path("workflows/<str:slug>/runs", views.workflow_runs, name="workflow-runs"),
    path("runs", views.run_list, name="run-list"),
    path("runs/<int:run_id>", views.run_detail, name="run-detail"),
    path("runs/<int:run_id>/events", views.run_events, name="run-events"),
    path("runs/<int:run_id>/checkpoints", views.run_checkpoints, name="run-checkpoints"),
    *[
        path(
            f"runs/<int:run_id>/{action}",
            views.run_action,
            {"action": action},
            name=f"run-{action}",
        )
        for action in ("resume", "cancel", "rollback")
    ],
    path(
        "runs/<int:run_id>/nodes/<str:node_key>/attempts",
        views.node_attempts,
        name="node-attempts",
    ),
    path("runs/<int:run_id>/nodes/<str:node_key>/logs", views.node_logs, name="node-logs"),
    *[
        path(
            f"runs/<int:run_id>/nodes/<str:node_key>/{segment}",
            views.node_action,
            {"action": action},
            name=f"node-{segment}",
        )
        for segment, action in (
            ("retry", "retry"),
            ("skip", "skip"),
            ("mark-succeeded", "mark_succeeded"),
        )
    ],
    re_path(r"^(?P<path>.*)$", views.not_found),
]
