from workflows.management.operator_command import OperatorCommand


class Command(OperatorCommand):
    action = "cancel"
