from django.apps import AppConfig


class WorkflowsConfig(AppConfig):
    name = "workflows"
    verbose_name = "Workflows"

    def ready(self):
        # Node types are registered by importing the modules named in KEEL_NODE_MODULES;
        # web processes and workers must agree on them, so both load them here.
        from workflows import registry

        registry.load_node_modules()
