from django.urls import path

from dashboard import action_views, diagnostics_views, views

app_name = "dashboard"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("workflows/", views.workflow_list, name="workflow-list"),
    path("workflows/<slug:slug>/", views.workflow_detail, name="workflow-detail"),
    path("workflows/<slug:slug>/diff/", views.workflow_diff, name="workflow-diff"),
    path("workflows/<slug:slug>/start/", action_views.start_run, name="workflow-start"),
    path("runs/", views.run_list, name="run-list"),
    path("runs/<int:run_id>/", views.run_detail, name="run-detail"),
    path("runs/<int:run_id>/live/", views.run_live, name="run-live"),
    path("findings/", diagnostics_views.findings, name="findings"),
    path("system/", diagnostics_views.system_report_page, name="system-report"),
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
