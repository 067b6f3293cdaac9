from django.urls import path

from diagnostics import views

app_name = "diagnostics"

urlpatterns = [
    path("findings/", views.findings, name="findings"),
    path("system/", views.system_report_page, name="system-report"),
    path("system/queues/<str:queue>/clear/", views.clear_queue, name="clear-queue"),
    path(
        "system/queues/<str:queue>/requeue-failed/",
        views.requeue_failed,
        name="requeue-failed",
    ),
    # For load balancers and orchestrators: no login, no trailing slash (no redirect).
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
]
