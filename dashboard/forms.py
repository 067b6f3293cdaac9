"""Forms of the dashboard: parse and check input; the operations decide what it means."""

import json
import uuid

from django import forms
from django.conf import settings

from workflows.definitions import limits as definition_limits
from workflows.models import Deployment, Run, Workflow

# --- Operator actions -------------------------------------------------------------------------


class JSONField(forms.CharField):
    """A textarea holding JSON; ``object_only`` insists on a JSON object."""

    widget = forms.Textarea

    def __init__(self, *, object_only: bool = False, **kwargs):
        self.object_only = object_only
        kwargs.setdefault("widget", forms.Textarea(attrs={"rows": 6, "spellcheck": "false"}))
        super().__init__(**kwargs)

    def to_python(self, value):
        text = (super().to_python(value) or "").strip()
        if not text:
            return {}
        if len(text.encode()) > settings.KEEL_MAX_OUTPUT_BYTES:
            raise forms.ValidationError(
                f"This is {len(text.encode())} bytes; the limit is "
                f"{settings.KEEL_MAX_OUTPUT_BYTES} (KEEL_MAX_OUTPUT_BYTES)."
            )
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise forms.ValidationError(
                f"Not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
            ) from None
        if self.object_only and not isinstance(value, dict):
            raise forms.ValidationError('Give a JSON object, e.g. {"date": "2026-01-31"}.')
        return value

    def prepare_value(self, value):
        if isinstance(value, dict | list):
            return json.dumps(value, indent=2, sort_keys=True)
        return value


class ActionForm(forms.Form):
    """What every action needs: a reason for the history, and a key for idempotency."""

    reason = forms.CharField(
        max_length=2000,
        widget=forms.Textarea(
            attrs={"rows": 3, "placeholder": "Why? It is kept in the run's history."}
        ),
        error_messages={"required": "Say why: the reason is kept in the run's history."},
    )
    # A fresh one is put in every rendered form: submitting the same form twice
    # (a double click, a browser retry) applies the action once.
    request_key = forms.CharField(max_length=100, widget=forms.HiddenInput)

    @staticmethod
    def new_request_key() -> str:
        return f"web-{uuid.uuid4().hex}"

    def options(self) -> dict:
        """The operation's keyword arguments other than actor, reason and request key."""
        return {}


class NodeActionForm(ActionForm):
    node = forms.CharField(max_length=100, widget=forms.HiddenInput)

    def options(self) -> dict:
        return {"node": self.cleaned_data["node"]}


class RetryForm(NodeActionForm):
    downstream = forms.BooleanField(required=False, widget=forms.HiddenInput)
    expected_attempt = forms.IntegerField(required=False, min_value=0, widget=forms.HiddenInput)

    def options(self) -> dict:
        return {
            "node": self.cleaned_data["node"],
            "downstream": self.cleaned_data["downstream"],
            "expected_attempt": self.cleaned_data["expected_attempt"],
        }


class StopNodeForm(NodeActionForm):
    expected_attempt = forms.IntegerField(required=False, min_value=0, widget=forms.HiddenInput)

    def options(self) -> dict:
        return {
            "node": self.cleaned_data["node"],
            "expected_attempt": self.cleaned_data["expected_attempt"],
        }


class MarkSucceededForm(NodeActionForm):
    output = JSONField(
        required=False,
        initial="{}",
        help_text="The node's output, as JSON: downstream nodes receive it as their input.",
    )

    def options(self) -> dict:
        return {"node": self.cleaned_data["node"], "output": self.cleaned_data["output"]}


class RollbackForm(ActionForm):
    to_checkpoint = forms.IntegerField(required=False, min_value=1, widget=forms.HiddenInput)
    to_node = forms.CharField(required=False, max_length=100, widget=forms.HiddenInput)
    resume = forms.BooleanField(
        required=False,
        initial=True,
        label="Resume the run right after rolling back",
        help_text="Unticked, the run is left cancelled until someone resumes it.",
    )

    def clean(self):
        data = super().clean()
        if bool(data.get("to_checkpoint")) == bool(data.get("to_node")):
            raise forms.ValidationError("Pick exactly one checkpoint or one node to roll back to.")
        return data

    def options(self) -> dict:
        return {
            "to_checkpoint": self.cleaned_data["to_checkpoint"],
            "to_node": self.cleaned_data["to_node"] or None,
            "resume": self.cleaned_data["resume"],
        }


class PreviewOptionsForm(forms.Form):
    """The query string of a preview page: which node, checkpoint or variant."""

    node = forms.CharField(required=False, max_length=100)
    downstream = forms.BooleanField(required=False)
    expected_attempt = forms.IntegerField(required=False, min_value=0)
    to_checkpoint = forms.IntegerField(required=False, min_value=1)
    to_node = forms.CharField(required=False, max_length=100)


# --- Starting a run ---------------------------------------------------------------------------


class StartRunForm(forms.Form):
    params = JSONField(
        object_only=True,
        required=False,
        label="Run params (JSON object)",
        help_text="Only params the definition declares; the others keep their defaults.",
        widget=forms.Textarea(attrs={"rows": 5, "spellcheck": "false"}),
    )
    priority = forms.ChoiceField(choices=Run.Priority.choices, initial=Run.Priority.DEFAULT)
    # A fresh key per rendered form: submitting it twice starts one run.
    request_key = forms.CharField(max_length=100, required=False, widget=forms.HiddenInput)


# --- Lists ------------------------------------------------------------------------------------

RANGES = {"1h": 1, "24h": 24, "7d": 7 * 24, "30d": 30 * 24}


class RunFilterForm(forms.Form):
    q = forms.CharField(
        required=False,
        max_length=200,
        label="Search",
        widget=forms.TextInput(
            attrs={"type": "search", "placeholder": "run id, workflow or error text"}
        ),
    )
    workflow = forms.ModelChoiceField(
        queryset=Workflow.objects.order_by("slug"),
        to_field_name="slug",
        required=False,
        empty_label="All workflows",
    )
    status = forms.ChoiceField(choices=[("", "Any status"), *Run.Status.choices], required=False)
    version = forms.IntegerField(
        required=False, min_value=1, widget=forms.NumberInput(attrs={"placeholder": "any"})
    )
    range = forms.ChoiceField(
        choices=[
            ("", "Any time"),
            ("1h", "Last hour"),
            ("24h", "Last 24 hours"),
            ("7d", "Last 7 days"),
            ("30d", "Last 30 days"),
        ],
        required=False,
    )
    created_from = forms.DateTimeField(
        required=False,
        label="From",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
    )
    created_to = forms.DateTimeField(
        required=False,
        label="To",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
    )
    before = forms.IntegerField(required=False, min_value=1, widget=forms.HiddenInput)
    after = forms.IntegerField(required=False, min_value=0, widget=forms.HiddenInput)


# --- Bulk actions -----------------------------------------------------------------------------


class RunIdsField(forms.Field):
    """Run ids, from checkboxes (``run=4&run=9``) or one hidden field (``4,9``)."""

    widget = forms.MultipleHiddenInput

    def to_python(self, value):
        values = value if isinstance(value, list | tuple) else [value or ""]
        items = [item.strip() for value in values for item in str(value).split(",")]
        try:
            ids = [int(item) for item in items if item]
        except ValueError:
            raise forms.ValidationError("Run ids are whole numbers.") from None
        if any(run_id < 1 for run_id in ids):
            raise forms.ValidationError("Run ids are whole numbers.")
        return ids


class BulkChoiceForm(forms.Form):
    """The runs ticked on the runs list and the action chosen for them."""

    action = forms.ChoiceField(choices=[("resume", "Resume"), ("cancel", "Cancel")])
    run = RunIdsField(required=False)


class BulkActionForm(ActionForm):
    action = forms.ChoiceField(
        choices=[("resume", "Resume"), ("cancel", "Cancel")], widget=forms.HiddenInput
    )
    run = RunIdsField()


# --- Deployments (dashboard/deployment_views.py) ----------------------------------------------


class DeploymentReasonForm(forms.Form):
    """What every deployment action needs: a reason, kept in the audit."""

    reason = forms.CharField(
        max_length=2000,
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "Why? It is kept in the audit."}),
        error_messages={"required": "Say why: the reason is kept in the audit."},
    )


class DeployForm(DeploymentReasonForm):
    version = forms.IntegerField(min_value=1)
    strategy = forms.ChoiceField(choices=Deployment.Strategy.choices, initial="canary")
    steps = forms.CharField(
        required=False,
        max_length=100,
        label="Canary steps (%)",
        widget=forms.TextInput(attrs={"placeholder": "10,50,100"}),
        help_text="Empty: the definition's own, else 10,50,100.",
    )
    min_runs = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=100000,
        label="Min runs per step",
        widget=forms.NumberInput(attrs={"placeholder": "20"}),
    )

    def clean_steps(self) -> list[int] | None:
        text = self.cleaned_data["steps"].strip()
        if not text:
            return None
        try:
            return [int(step) for step in text.replace(" ", "").split(",") if step]
        except ValueError:
            raise forms.ValidationError(
                "Give whole percentages separated by commas, e.g. 10,50,100."
            ) from None


class PromoteForm(DeploymentReasonForm):
    # The step the operator saw: a second submit of the same form finds it moved on.
    step = forms.IntegerField(min_value=0, widget=forms.HiddenInput)


class RollbackVersionForm(DeploymentReasonForm):
    to = forms.IntegerField(min_value=1, widget=forms.HiddenInput)
    runs = forms.ChoiceField(
        choices=[
            ("finish", "Let them finish on their version"),
            ("cancel", "Cancel them"),
            ("restart", "Cancel them and start them again on the chosen version"),
        ],
        initial="finish",
        widget=forms.RadioSelect,
        label="Runs on the version left",
    )


class MoveRunsForm(DeploymentReasonForm):
    runs = forms.ChoiceField(
        choices=[
            ("restart", "Cancel them and start them again on the live version"),
            ("cancel", "Cancel them"),
        ],
        initial="restart",
        widget=forms.RadioSelect,
        label="The runs left on this version",
    )


UPLOAD_DEPLOY_CHOICES = [
    ("default", "As the definition says (at once without a deploy section)"),
    ("immediate", "At once"),
    ("canary", "Canary"),
    ("blue_green", "Blue-green"),
    ("none", "Do not deploy (load the version only)"),
]


class UploadDefinitionForm(forms.Form):
    """A definition pasted or chosen as a file; the file wins when both are given."""

    source = forms.CharField(
        required=False,
        strip=False,  # stored as given, as a file is
        label="Definition (YAML or JSON)",
        widget=forms.Textarea(attrs={"rows": 18, "spellcheck": "false"}),
    )
    file = forms.FileField(required=False, label="…or a file")
    # Only asked for with the load: a check leaves it out.
    deploy = forms.ChoiceField(choices=UPLOAD_DEPLOY_CHOICES, initial="default", required=False)
    reason = forms.CharField(
        required=False,
        max_length=2000,
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "Why? It is kept in the audit."}),
    )
    # The checksum of the text last checked: "Load" loads only what was checked.
    checked = forms.CharField(required=False, max_length=64, widget=forms.HiddenInput)

    def clean(self):
        data = super().clean()
        data["deploy"] = data.get("deploy") or "default"
        upload = data.get("file")
        if upload:
            limit = definition_limits.MAX_FILE_BYTES
            raw = upload.read(limit + 1)
            if len(raw) > limit:
                raise forms.ValidationError(f"The file is over {limit} bytes, the limit.")
            try:
                data["source"] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise forms.ValidationError("The file is not UTF-8 text.") from None
        # As load_file reads a file: universal newlines.
        data["source"] = (data.get("source") or "").replace("\r\n", "\n").replace("\r", "\n")
        if not data["source"].strip():
            raise forms.ValidationError("Paste a definition or choose a file.")
        if len(data["source"].encode()) > definition_limits.MAX_FILE_BYTES:
            raise forms.ValidationError(
                f"The definition is over {definition_limits.MAX_FILE_BYTES} bytes, the limit."
            )
        return data
