from django.apps import AppConfig
from django.db.models.signals import post_migrate


class WorkflowsConfig(AppConfig):
    name = "workflows"
    verbose_name = "Workflows"

    def ready(self):
        # Node types are registered by importing the modules named in KEEL_NODE_MODULES;
        # web processes and workers must agree on them, so both load them here.
        from workflows.definitions import registry

        registry.load_node_modules()

        post_migrate.connect(use_sqlite_write_ahead_log, sender=self)


def use_sqlite_write_ahead_log(using, **kwargs):
    """SQLite: switch the database file to write-ahead logging, once and for good.

    With WAL, readers (the dashboard) never wait for writers (the workers). The mode is
    stored in the file, so every later connection has it without asking.
    """
    from django.db import connections

    connection = connections[using]
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")
