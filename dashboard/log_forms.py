"""The Logs page's search form: parse and check the query; workflows.log_search reads."""

from datetime import datetime, timedelta

from django import forms
from django.utils import timezone

from workflows import log_search
from workflows.models import Workflow

WINDOWS = {
    "15m": ("Last 15 minutes", timedelta(minutes=15)),
    "1h": ("Last hour", timedelta(hours=1)),
    "24h": ("Last 24 hours", timedelta(hours=24)),
    "7d": ("Last 7 days", timedelta(days=7)),
    "30d": ("Last 30 days", timedelta(days=30)),
    "all": ("Any time", None),
}
DEFAULT_WINDOW = "24h"
MOMENT = forms.DateTimeInput(attrs={"type": "datetime-local", "step": 1}, format="%Y-%m-%dT%H:%M")


class LevelField(forms.ChoiceField):
    """A level in any case (``?level=error`` in a hand-typed URL)."""

    def to_python(self, value):
        return super().to_python(value).upper()


class LogSearchForm(forms.Form):
    q = forms.CharField(
        required=False,
        max_length=200,
        label="Text",
        widget=forms.TextInput(attrs={"type": "search", "placeholder": "contains (any case)"}),
    )
    level = LevelField(
        required=False,
        label="Level at least",
        choices=[("", "Any level"), *((level, level) for level in log_search.LEVELS)],
    )
    workflow = forms.ModelChoiceField(
        queryset=Workflow.objects.order_by("slug"),
        to_field_name="slug",
        required=False,
        empty_label="All workflows",
    )
    node = forms.CharField(
        required=False,
        max_length=100,
        label="Node",
        widget=forms.TextInput(attrs={"placeholder": "node key", "spellcheck": "false"}),
    )
    run = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=log_search.MAX_ID,
        label="Run",
        widget=forms.NumberInput(attrs={"placeholder": "any"}),
    )
    window = forms.ChoiceField(
        required=False,
        label="When",
        choices=[(key, label) for key, (label, _) in WINDOWS.items()],
        initial=DEFAULT_WINDOW,
    )
    since = forms.DateTimeField(required=False, label="From", widget=MOMENT)
    until = forms.DateTimeField(required=False, label="To", widget=MOMENT)
    cursor = forms.CharField(required=False, max_length=200, widget=forms.HiddenInput)

    def __init__(self, data=None, **kwargs):
        # "When" left out means the default window, or none once From or To is given: the
        # select then shows what is searched.
        if data is not None and not data.get("window"):
            data = data.copy()
            data["window"] = "all" if data.get("since") or data.get("until") else DEFAULT_WINDOW
        super().__init__(data, **kwargs)

    def clean_cursor(self):
        text = self.cleaned_data["cursor"]
        if not text:
            return None
        try:
            return log_search.Cursor.decode(text)
        except ValueError:
            raise forms.ValidationError(
                "This page link is not one Keel made; start again from the newest lines."
            ) from None

    def clean(self):
        data = super().clean()
        since, until = data.get("since"), data.get("until")
        if since and until and since >= until:
            raise forms.ValidationError("“From” must be before “To”.")
        return data

    def window_start(self, now: datetime) -> datetime | None:
        """The later of "When" and "From"."""
        data = self.cleaned_data
        span = WINDOWS[data.get("window") or DEFAULT_WINDOW][1]
        starts = [moment for moment in (data.get("since"), span and now - span) if moment]
        return max(starts) if starts else None

    def window_words(self) -> str:
        """The window in words ("in the last 24 hours"), or "" when From or To is given
        (the page shows the moments instead); call only on a valid form."""
        data = self.cleaned_data
        if data.get("since") or data.get("until"):
            return ""
        key = data.get("window") or DEFAULT_WINDOW
        return "at any time" if key == "all" else f"in the {WINDOWS[key][0].lower()}"

    def log_filter(self, now: datetime | None = None) -> log_search.LogFilter:
        """What to search for; call only on a valid form."""
        now = now or timezone.now()
        data = self.cleaned_data
        workflow = data.get("workflow")
        return log_search.LogFilter(
            text=data.get("q") or "",
            level=data.get("level") or "",
            workflow_id=workflow.pk if workflow else None,
            node=(data.get("node") or "").strip(),
            run_id=data.get("run"),
            since=self.window_start(now),
            until=data.get("until"),
        )

    @classmethod
    def default_filter(cls, now: datetime | None = None) -> log_search.LogFilter:
        """The search an empty (or invalid) form stands for: everything, last 24 hours."""
        return log_search.LogFilter(since=log_search.default_since(now))
