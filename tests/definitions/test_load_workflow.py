"""``manage.py load_workflow``: definitions become immutable versions, or nothing at all."""

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from workflows import engine
from workflows.definitions import spec, versioning
from workflows.models import NodeRun, ResourcePool, Run, Workflow, WorkflowVersion

pytestmark = pytest.mark.django_db

DEMO_DIR = Path(spec.__file__).resolve().parents[1] / "demo_definitions"

SALES = """\
name: Daily sales
description: Sales per region.
pools: {warehouse_db: 2}
nodes:
  extract: {type: test.record, params: {value: 1}}
  load: {type: keel.noop, after: [extract], pool: warehouse_db}
"""

SALES_REFORMATTED = """\
# The same workflow, written differently: no new version.
description: "Sales per region."
nodes:
  extract:
    params: {value: 1}   # one row
    type: test.record
  load:
    type: keel.noop
    pool: warehouse_db
    after: extract
pools:
  warehouse_db: 2
name: Daily sales
"""

SALES_V2 = """\
name: Daily sales
description: Sales per region.
pools: {warehouse_db: 2}
nodes:
  extract: {type: test.record, params: {value: 1}}
  transform: {type: test.record, params: {value: 2}, after: [extract]}
  load: {type: keel.noop, after: [transform], pool: warehouse_db}
"""

INVALID = """\
name: Broken
pools: {broken_pool: 3}
nodes:
  a: {type: keel.noop, after: [b]}
  b: {type: keel.noop, after: [a]}
  c: {type: sales.nope}
"""


@pytest.fixture
def write(tmp_path):
    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def load(*paths, **options) -> str:
    out = StringIO()
    call_command("load_workflow", *[str(path) for path in paths], stdout=out, **options)
    return out.getvalue()


def assert_nothing_written():
    assert Workflow.objects.count() == 0
    assert WorkflowVersion.objects.count() == 0
    assert ResourcePool.objects.count() == 0


# --- created, unchanged, new versions ----------------------------------------------------------


def test_new_definition_is_created_as_version_1(write):
    path = write("sales.yaml", SALES)

    output = load(path)

    assert output.strip() == "daily-sales v1 created"
    workflow = Workflow.objects.get(slug="daily-sales")
    assert (workflow.name, workflow.description) == ("Daily sales", "Sales per region.")
    version = WorkflowVersion.objects.get(workflow=workflow)
    parsed = spec.parse(SALES)
    assert version.number == 1
    assert version.spec == parsed.spec
    assert version.checksum == parsed.checksum
    assert version.source == SALES
    assert version.created_by.startswith("cli:")


def test_stored_spec_still_matches_its_checksum(write):
    load(write("sales.yaml", SALES_V2))

    version = WorkflowVersion.objects.get()
    version.refresh_from_db()
    assert spec.checksum(version.spec) == version.checksum


def test_reloading_the_same_file_leaves_it_unchanged(write):
    path = write("sales.yaml", SALES)
    load(path)

    output = load(path)

    assert output.strip() == "daily-sales v1 unchanged"
    assert WorkflowVersion.objects.count() == 1


def test_reformatting_and_comments_do_not_make_a_version(write):
    load(write("sales.yaml", SALES))

    output = load(write("sales.yaml", SALES_REFORMATTED))

    assert output.strip() == "daily-sales v1 unchanged"
    assert WorkflowVersion.objects.count() == 1


def test_changed_content_creates_v2_and_leaves_v1_untouched(write):
    load(write("sales.yaml", SALES))
    v1 = WorkflowVersion.objects.get(number=1)
    v1_before = (v1.spec, v1.checksum, v1.source, v1.created_at)

    output = load(write("sales.yaml", SALES_V2))

    assert output.strip() == "daily-sales v2 created"
    v1.refresh_from_db()
    assert (v1.spec, v1.checksum, v1.source, v1.created_at) == v1_before
    v2 = WorkflowVersion.objects.get(number=2)
    assert v2.workflow_id == v1.workflow_id
    assert v2.checksum != v1.checksum
    # PostgreSQL's jsonb does not keep key order, so compare the node keys as a set.
    assert set(v2.spec["nodes"]) == {"extract", "transform", "load"}
    assert Workflow.objects.count() == 1


def test_going_back_to_earlier_content_makes_a_new_version(write):
    path = write("sales.yaml", SALES)
    load(path)
    load(write("sales.yaml", SALES_V2))

    output = load(write("sales.yaml", SALES))

    assert output.strip() == "daily-sales v3 created"
    assert (
        WorkflowVersion.objects.get(number=3).checksum
        == WorkflowVersion.objects.get(number=1).checksum
    )


def test_once_does_not_load_content_the_workflow_already_had(write):
    first = write("sales.yaml", SALES)
    load(first)
    load(write("sales_v2.yaml", SALES_V2))  # an operator's newer version

    again = versioning.load_file(first, actor="devstack", once=True)

    assert str(again) == "daily-sales v2 unchanged", "the operator's version stays the latest"
    assert WorkflowVersion.objects.count() == 2
    changed = versioning.load_file(
        write("sales.yaml", SALES.replace("Sales per region.", "Sales per region, changed.")),
        actor="devstack",
        once=True,
    )
    assert str(changed) == "daily-sales v3 created", "a changed file is loaded"


def test_note_is_stored_on_the_version(write):
    load(write("sales.yaml", SALES), note="first cut for the Monday report")

    assert WorkflowVersion.objects.get().note == "first cut for the Monday report"


def test_several_files_are_loaded_in_one_call(write):
    other = SALES.replace("Daily sales", "Weekly sales")

    output = load(write("daily.yaml", SALES), write("weekly.json", other))

    assert output.splitlines() == ["daily-sales v1 created", "weekly-sales v1 created"]


def test_json_file_is_loaded(write):
    path = write(
        "sales.json",
        '{"name": "Daily sales", "nodes": {"extract": {"type": "test.record", "params": {"value": 1}}}}',
    )

    assert load(path).strip() == "daily-sales v1 created"


def test_all_demo_definitions_load():
    paths = sorted(DEMO_DIR.glob("*.yaml"))

    output = load(*paths)

    assert len(paths) >= 3
    assert output.splitlines() == [
        f"{spec.parse(path.read_text()).slug} v1 created" for path in paths
    ]


def test_load_definition_dry_run_writes_nothing():
    result = versioning.load_definition(SALES, actor="test", dry_run=True)

    assert result is None
    assert_nothing_written()


# --- invalid input writes nothing --------------------------------------------------------------


def test_invalid_file_writes_nothing_and_names_every_problem(write):
    path = write("broken.yaml", INVALID)

    with pytest.raises(CommandError) as caught:
        load(path)

    message = str(caught.value)
    assert f"{path} is not a valid workflow definition" in message
    assert "nodes.a.after: cycle: " in message or "nodes.b.after: cycle: " in message
    assert "nodes.c.type: no node type named 'sales.nope' is registered" in message
    assert message.rstrip().endswith("Nothing was loaded. Fix the fields above and run again.")
    assert_nothing_written()


def test_one_invalid_file_among_several_loads_none_of_them(write):
    good = write("sales.yaml", SALES)
    bad = write("broken.yaml", INVALID)
    also_good = write("weekly.yaml", SALES.replace("Daily sales", "Weekly sales"))

    with pytest.raises(CommandError) as caught:
        load(good, bad, also_good)

    message = str(caught.value)
    assert str(bad) in message
    assert str(good) not in message
    assert str(also_good) not in message
    assert_nothing_written()


def test_every_invalid_file_is_reported(write):
    first = write("first.yaml", INVALID)
    second = write("second.yaml", "name: Second\nnodes: {a: {type: keel.noop, timeout: 0}}\n")

    with pytest.raises(CommandError) as caught:
        load(first, second)

    message = str(caught.value)
    assert f"{first} is not a valid workflow definition" in message
    assert f"{second} is not a valid workflow definition" in message
    assert "nodes.a.timeout: must be whole seconds between 1 and 3600 (got 0)" in message
    assert_nothing_written()


def test_invalid_new_version_leaves_the_existing_one_alone(write):
    load(write("sales.yaml", SALES))
    broken = SALES_V2.replace("type: keel.noop", "type: keel.noop, timeout: 99999")

    with pytest.raises(CommandError):
        load(write("sales.yaml", broken))

    assert list(WorkflowVersion.objects.values_list("number", flat=True)) == [1]


@pytest.mark.parametrize(
    "source",
    [
        "name: x\nnodes: {a: {type: keel.sleep, params: {seconds: .nan}}}\n",
        "name: x\nparams: {day: 2024-01-01}\nnodes: {a: {type: keel.noop}}\n",
    ],
    ids=["nan-float-param", "date-run-param"],
)
def test_value_that_json_cannot_hold_is_a_command_error(write, source):
    with pytest.raises(CommandError, match="Nothing was loaded"):
        load(write("odd.yaml", source))


def test_bad_yaml_file_reports_its_line(write):
    path = write(
        "sales.yaml", "name: Daily sales\nnodes:\n  extract: {type: keel.noop\n  load: 1\n"
    )

    with pytest.raises(CommandError) as caught:
        load(path)

    assert "(file): not valid YAML or JSON at line 4" in str(caught.value)
    assert_nothing_written()


def test_missing_file_is_a_clear_error(tmp_path, write):
    good = write("sales.yaml", SALES)
    missing = tmp_path / "no-such-file.yaml"

    with pytest.raises(CommandError) as caught:
        load(good, missing)

    message = str(caught.value)
    assert f"{missing} is not a valid workflow definition" in message
    assert "(file): cannot be read" in message
    assert "No such file or directory" in message
    assert_nothing_written()


def test_directory_instead_of_a_file_is_a_clear_error(tmp_path):
    with pytest.raises(CommandError) as caught:
        load(tmp_path)

    assert "(file): cannot be read" in str(caught.value)
    assert_nothing_written()


def test_file_that_is_not_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: Ventes journalières\nnodes: {a: {type: keel.noop}}\n".encode("latin-1"))

    with pytest.raises(CommandError) as caught:
        load(path)

    assert "(file): cannot be read" in str(caught.value)
    assert "utf-8" in str(caught.value)
    assert_nothing_written()


def test_no_path_is_a_usage_error():
    with pytest.raises(CommandError, match="paths"):
        load()


# --- pools -------------------------------------------------------------------------------------


def test_declared_pools_are_created_with_their_slots(write):
    source = SALES.replace("pools: {warehouse_db: 2}", "pools: {warehouse_db: 2, crm_api: 5}")

    load(write("sales.yaml", source))

    assert dict(ResourcePool.objects.values_list("name", "slots")) == {
        "warehouse_db": 2,
        "crm_api": 5,
    }


def test_existing_pool_keeps_its_slots(write):
    ResourcePool.objects.create(name="warehouse_db", slots=7)

    load(write("sales.yaml", SALES))

    assert ResourcePool.objects.get(name="warehouse_db").slots == 7


def test_new_version_does_not_resize_a_pool(write):
    load(write("sales.yaml", SALES))

    output = load(write("sales.yaml", SALES.replace("warehouse_db: 2", "warehouse_db: 9")))

    assert output.strip() == "daily-sales v2 created"
    assert ResourcePool.objects.get(name="warehouse_db").slots == 2


# --- runs stay pinned --------------------------------------------------------------------------


def test_run_stays_pinned_to_its_version_after_v2_is_loaded(write):
    load(write("sales.yaml", SALES))
    v1 = WorkflowVersion.objects.get(number=1)
    run = engine.start_run(v1, params={}, trigger="t")

    load(write("sales.yaml", SALES_V2))

    run.refresh_from_db()
    assert run.version_id == v1.pk
    assert set(NodeRun.objects.filter(run=run).values_list("node_key", flat=True)) == {
        "extract",
        "load",
    }
    v1.refresh_from_db()
    assert "transform" not in v1.spec["nodes"]
    v2 = WorkflowVersion.objects.get(number=2)
    newer = engine.start_run(v2, params={}, trigger="t")
    assert set(NodeRun.objects.filter(run=newer).values_list("node_key", flat=True)) == {
        "extract",
        "transform",
        "load",
    }
    assert Run.objects.get(pk=run.pk).version_id == v1.pk


def test_a_run_copies_each_node_s_stall_after(write):
    load(
        write(
            "stall.yaml",
            "name: Stall\nnodes:\n"
            "  slow: {type: keel.noop, timeout: 120, stall_after: 60}\n"
            "  plain: {type: keel.noop}\n",
        )
    )
    run = engine.start_run(WorkflowVersion.objects.get(), params={}, trigger="t")

    stall_after = dict(
        NodeRun.objects.filter(run=run).values_list("node_key", "stall_after_seconds")
    )
    assert stall_after == {"slow": 60, "plain": None}
