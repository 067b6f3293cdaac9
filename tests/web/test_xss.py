"""Whatever users, definitions and nodes put in — names, descriptions, params, outputs,
error messages, tracebacks, log lines, reasons — the dashboard shows it as text."""

from html.parser import HTMLParser

import pytest
import yaml
from django.utils import timezone

from diagnostics.models import Finding
from tests.web.conftest import nodes, work
from workflows import engine, operations
from workflows.definitions import versioning
from workflows.definitions.spec import DefinitionError
from workflows.models import LogLine, NodeAttempt

pytestmark = pytest.mark.django_db

XSS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "javascript:alert(1)",
    "{{7*7}}",
    "'><svg onload=alert(1)>",
    "</textarea><script>alert(2)</script>",
    "</pre></code><iframe src=javascript:alert(3)>",
]
PAYLOAD = " ".join(XSS)


OUR_SCRIPTS = ("/static/vendor/htmx.min.js", "/static/times.js", "/static/select_all.js")


class Markup(HTMLParser):
    """Collects what a browser would treat as active content."""

    def __init__(self):
        super().__init__()
        self.problems: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "iframe", "img", "object", "embed") and not (
            tag == "script" and dict(attrs).get("src") in OUR_SCRIPTS
        ):
            self.problems.append(f"<{tag} {attrs}>")
        for name, value in attrs:
            if name.startswith("on"):
                self.problems.append(f"<{tag}> has handler {name}={value!r}")
            if name in ("href", "src", "action", "hx-get", "hx-post") and (
                value or ""
            ).strip().lower().startswith("javascript:"):
                self.problems.append(f"<{tag}> {name}={value!r}")


def assert_inert(html: str, where: str) -> None:
    parser = Markup()
    parser.feed(html)
    assert parser.problems == [], where
    assert "<script>alert" not in html and "<img src=x" not in html, where


@pytest.fixture
def hostile_run(operator, make_version):
    """A run whose every user- or node-supplied string is the XSS corpus."""
    definition = {
        "name": PAYLOAD[:150],
        "slug": "hostile",
        "description": PAYLOAD,
        "params": {"note": PAYLOAD},
        "nodes": {
            "load": {"type": "demo.load_summary", "params": {"table": PAYLOAD}},
            "after_load": {"type": "test.effect", "after": ["load"]},
            "third": {"type": "test.effect", "after": ["after_load"]},
        },
    }
    make_version(definition)
    source = yaml.safe_dump({**definition, "description": PAYLOAD + " v2"}, sort_keys=False)
    versioning.load_definition("# " + PAYLOAD + "\n" + source, actor=PAYLOAD[:100], note=PAYLOAD)
    version = make_version(definition)
    run = engine.start_run(version, params={"note": PAYLOAD}, trigger=PAYLOAD[:150])
    work(
        run,
        "load",
        output={"said": PAYLOAD, PAYLOAD: [PAYLOAD]},
        logs=XSS,
        checkpoint={"at": PAYLOAD},
    )
    work(run, "after_load", fail="ValueError", message=PAYLOAD)
    NodeAttempt.objects.filter(node_run__run=run, node_run__node_key="after_load").update(
        worker=PAYLOAD[:200], host=PAYLOAD[:200], traceback=PAYLOAD
    )
    LogLine.objects.create(
        attempt=NodeAttempt.objects.get(node_run__run=run, node_run__node_key="after_load"),
        seq=1,
        at=timezone.now(),
        level=PAYLOAD[:10],
        message=PAYLOAD,
    )
    now = timezone.now()
    Finding.objects.create(
        code="heartbeat_stale",
        subject="hostile",
        run=run,
        node_run=nodes(run)["after_load"],
        queue=PAYLOAD[:100],
        title=PAYLOAD[:300],
        suggestion=PAYLOAD,
        first_seen=now,
        last_seen=now,
    )
    operations.skip_node(run.pk, "third", actor=operations.Actor.for_user(operator), reason=PAYLOAD)
    return run


def test_the_corpus_renders_as_text_on_every_page(operator_client, hostile_run):
    run = hostile_run
    urls = [
        "/",
        "/workflows/",
        "/workflows/hostile/",
        "/workflows/hostile/diff/?from=1&to=2",
        "/workflows/hostile/diff/?from=2&to=3",
        "/runs/",
        f"/runs/{run.pk}/",
        f"/runs/{run.pk}/?node=load",
        f"/runs/{run.pk}/?node=after_load",
        f"/runs/{run.pk}/?node=third",
        f"/runs/{run.pk}/live/?node=load",
        f"/runs/{run.pk}/resume/preview/",
        f"/runs/{run.pk}/rollback/preview/",
        f"/runs/{run.pk}/mark-succeeded/preview/?node=after_load",
    ]
    for url in urls:
        response = operator_client.get(url)
        assert response.status_code in (200, 286), url
        assert_inert(response.content.decode(), url)


def test_the_corpus_is_shown_escaped_not_dropped(operator_client, hostile_run):
    page = operator_client.get(f"/runs/{hostile_run.pk}/?node=load").content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # a log line
    assert "{{7*7}}" in page and ">49<" not in page
    assert "javascript:alert(1)" in page  # as text, never as a link
    failed = operator_client.get(f"/runs/{hostile_run.pk}/?node=after_load").content.decode()
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in failed  # the error message
    diff = operator_client.get("/workflows/hostile/diff/?from=1&to=2").content.decode()
    assert "+" in diff and "&lt;/textarea&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in diff


def test_hostile_input_in_forms_is_shown_back_as_text(operator_client, hostile_run):
    response = operator_client.post(
        f"/runs/{hostile_run.pk}/mark-succeeded/",
        {"reason": "", "request_key": PAYLOAD[:100], "node": "after_load", "output": PAYLOAD},
    )
    assert response.status_code == 400
    assert_inert(response.content.decode(), "mark-succeeded form")
    started = operator_client.post("/workflows/hostile/start/", {"params": PAYLOAD})
    assert started.status_code == 400
    assert_inert(started.content.decode(), "start form")


@pytest.mark.parametrize("key", ["<script>", '"><img', "javascript:x", "{{7*7}}"])
def test_hostile_node_keys_never_reach_a_page(key):
    """Node keys are letters, digits, '-' and '_' (spec.NODE_KEY_PATTERN): the corpus is
    refused when the definition is loaded, so it cannot be drawn into the graph."""
    with pytest.raises(DefinitionError, match="nodes"):
        versioning.load_definition(
            yaml.safe_dump({"name": "Keys", "nodes": {key: {"type": "keel.noop"}}}), actor="t"
        )


def test_the_timeline_rows_escape_what_they_show():
    """Node keys are plain words (the spec says so); the rows escape anyway."""
    from dashboard.run_page import Bar, TimelineRow
    from dashboard.templatetags.keel import timeline_rows

    evil = '<script>alert(1)</script>"'
    bar = Bar(attempt=1, status="failed", left=0, width=50, wait_left=0, wait_width=2, title=evil)
    html = timeline_rows([TimelineRow(key=evil, href=f"?node={evil}", bars=[bar])])

    assert "<script>" not in html and '"<' not in html
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;&quot;") == 4
