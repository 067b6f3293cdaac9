from workflows.management.deployment_command import DeploymentActionCommand


class Command(DeploymentActionCommand):
    help = "Abort a canary or blue-green deployment: every new run gets the live version again."
    action = "abort"
