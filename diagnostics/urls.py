from django.urls import path

from diagnostics import views

app_name = "diagnostics"

# For load balancers and orchestrators: no login, no trailing slash (no redirect).
urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
]
