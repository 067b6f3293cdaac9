from django.apps import AppConfig


class DiagnosticsConfig(AppConfig):
    name = "diagnostics"
    verbose_name = "Diagnostics"

    def ready(self):
        # Keel's metrics are computed at scrape time; registering costs nothing until then.
        from diagnostics import actions, metrics  # noqa: F401  (actions registers the queue actions)

        metrics.register()
