from workflows.management.deployment_command import DeploymentActionCommand


class Command(DeploymentActionCommand):
    help = "Promote a deployment: a canary to its next step (active after the last), a blue-green one without waiting for its validation."
    action = "promote"
