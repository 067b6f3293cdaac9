from django.apps import AppConfig


class DashboardConfig(AppConfig):
    """The pages: they read workflows and diagnostics; neither imports this app."""

    name = "dashboard"
    verbose_name = "Dashboard"
