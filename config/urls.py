from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from config.api import urls as api_urls

urlpatterns = [
    path("", include("dashboard.urls")),
    path("", include("diagnostics.urls")),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/", api_urls),
    path("django-rq/", include("django_rq.urls")),
    path("", include("django_prometheus.urls")),
]
