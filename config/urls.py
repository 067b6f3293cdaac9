from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from config.api import urls as api_urls

# django-rq's own pages are not served: they let any staff user empty a queue or delete
# jobs with no permission check and no audit. Keel's queue pages and their audited actions
# (diagnostics) take their place; django_rq stays installed for ``manage.py rqworker``.
urlpatterns = [
    path("", include("dashboard.urls")),
    path("", include("diagnostics.urls")),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/", api_urls),
    path("", include("django_prometheus.urls")),
]
