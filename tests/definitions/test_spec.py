"""Parsing and validating workflow definitions (workflows/definitions/spec.py).

Every invalid definition must raise ``DefinitionError`` whose problems name the field
(``nodes.<key>.<field>``) so a user can find and fix it; nothing here touches the database.
"""

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from workflows.definitions import graph, spec
from workflows.definitions.spec import DefinitionError, parse

DEMO_DIR = Path(spec.__file__).resolve().parents[1] / "demo_definitions"
DEMO_FILES = sorted(DEMO_DIR.glob("*.yaml"))


def yaml_text(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def problems_of(source: str) -> dict[str, str]:
    """The problems of an invalid definition as {field path: message}."""
    with pytest.raises(DefinitionError) as caught:
        parse(source, source_name="test.yaml")
    problems = caught.value.problems
    paths = [path for path, _ in problems]
    assert len(paths) == len(set(paths)), f"one problem per field expected: {problems}"
    return dict(problems)


def definition(**nodes) -> str:
    """A definition named 'Daily sales' whose nodes are given as dicts."""
    return yaml.safe_dump({"name": "Daily sales", "nodes": nodes}, sort_keys=False)


def one_node(**fields) -> str:
    return definition(load={"type": "keel.noop", **fields})


# --- what a valid definition becomes -----------------------------------------------------------


def test_valid_definition_is_normalised_with_defaults():
    parsed = parse(
        yaml_text(
            """
            name: Daily sales
            nodes:
              extract: {type: test.record, params: {value: 3}}
              load: {type: keel.noop, after: extract}
            """
        )
    )

    assert parsed.slug == "daily-sales"
    assert parsed.spec["name"] == "Daily sales"
    assert parsed.spec["pools"] == {}
    load = parsed.spec["nodes"]["load"]
    assert load["after"] == ["extract"]  # a single name becomes a list
    assert load["timeout"] == 30  # KEEL_DEFAULT_TIMEOUT
    assert load["soft_timeout"] is None
    assert load["pool"] == ""
    assert load["retries"] == {
        "max_attempts": 1,
        "backoff": 5,
        "factor": 2,
        "max_delay": 300,
        "jitter": True,
        "retry_on": [],
    }


def test_default_node_timeout_follows_the_setting(settings):
    settings.KEEL_DEFAULT_TIMEOUT = 45

    parsed = parse(one_node())

    assert parsed.spec["nodes"]["load"]["timeout"] == 45


def test_explicit_slug_is_kept():
    parsed = parse("name: Daily sales\nslug: sales_daily\nnodes: {a: {type: keel.noop}}\n")

    assert parsed.slug == "sales_daily"


def test_definition_keeps_its_source_text():
    source = "# owned by the data team\n" + one_node()

    assert parse(source).source == source


# --- graph: after, self-dependency, cycles -----------------------------------------------------


def test_after_naming_a_missing_node_names_the_node_and_field():
    problems = problems_of(
        definition(
            extract={"type": "keel.noop"},
            load={"type": "keel.noop", "after": ["extract", "transform"]},
        )
    )

    assert problems == {
        "nodes.load.after": "names 'transform', which is not a node of this workflow"
    }


def test_node_cannot_run_after_itself():
    problems = problems_of(one_node(after=["load"]))

    assert problems == {"nodes.load.after": "a node cannot run after itself"}


def test_two_node_cycle_is_reported_with_its_path():
    problems = problems_of(
        definition(
            a={"type": "keel.noop", "after": ["b"]},
            b={"type": "keel.noop", "after": ["a"]},
        )
    )

    assert problems == {"nodes.a.after": "cycle: a -> b -> a"}


def test_cycle_behind_a_valid_root_is_reported_with_its_path():
    problems = problems_of(
        definition(
            start={"type": "keel.noop"},
            a={"type": "keel.noop", "after": ["start", "c"]},
            b={"type": "keel.noop", "after": ["a"]},
            c={"type": "keel.noop", "after": ["b"]},
        )
    )

    [(path, message)] = problems.items()
    assert path in {"nodes.a.after", "nodes.b.after", "nodes.c.after"}
    assert message.startswith("cycle: ")
    cycle = message.removeprefix("cycle: ").split(" -> ")
    assert cycle[0] == cycle[-1]
    assert sorted(cycle[:-1]) == ["a", "b", "c"]
    assert "start" not in cycle


def test_after_naming_the_same_node_twice_is_rejected():
    problems = problems_of(
        definition(
            extract={"type": "keel.noop"}, load={"type": "keel.noop", "after": ["extract"] * 2}
        )
    )

    assert problems == {"nodes.load.after": "names the same node twice"}


@pytest.mark.parametrize("after", [5, [1], {"extract": True}])
def test_after_that_is_not_a_list_of_names_is_rejected(after):
    problems = problems_of(
        definition(extract={"type": "keel.noop"}, load={"type": "keel.noop", "after": after})
    )

    assert problems == {"nodes.load.after": "must be a list of node keys"}


def test_find_cycle_is_empty_for_a_dag():
    nodes = {
        "a": {"after": []},
        "b": {"after": ["a"]},
        "c": {"after": ["a", "b"]},
    }

    assert graph.find_cycle(nodes) == []
    assert graph.topological_order({"nodes": nodes}) == ["a", "b", "c"]


# --- node types and params ---------------------------------------------------------------------


def test_unknown_node_type_names_the_node_and_type():
    problems = problems_of(one_node(type="sales.does_not_exist"))

    assert problems == {
        "nodes.load.type": "no node type named 'sales.does_not_exist' is registered"
    }


def test_missing_node_type_is_rejected():
    problems = problems_of(definition(load={"params": {}}))

    assert problems == {"nodes.load.type": "required: the name of a registered node type"}


def test_wrong_param_type_names_the_param():
    problems = problems_of(one_node(type="test.record", params={"value": "ten"}))

    assert problems == {"nodes.load.params.value": "must be int, got str 'ten'"}


def test_bool_is_not_accepted_for_an_int_param():
    problems = problems_of(one_node(type="test.record", params={"value": True}))

    assert problems == {"nodes.load.params.value": "must be int, got bool True"}


def test_int_is_accepted_for_a_float_param():
    parsed = parse(one_node(type="test.record", params={"value": 1, "sleep": 2}))

    assert parsed.spec["nodes"]["load"]["params"] == {"value": 1, "sleep": 2}


def test_missing_required_param_is_rejected():
    problems = problems_of(one_node(type="test.fail_until", params={"error": "ValueError"}))

    assert problems == {"nodes.load.params.succeed_on": "required by test.fail_until"}


def test_unknown_param_lists_the_known_ones():
    problems = problems_of(one_node(type="test.record", params={"colour": "red"}))

    assert problems == {
        "nodes.load.params.colour": "unknown parameter for test.record (known: sleep, value)"
    }


def test_params_that_are_not_a_mapping_are_rejected():
    problems = problems_of(one_node(type="keel.noop", params=["a", "b"]))

    assert problems == {"nodes.load.params": "must be a mapping"}


# --- timeouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "timeout",
    [0, -5, 3601, "30", 30.5, True, None],
    ids=["zero", "negative", "above-max", "string", "float", "bool", "null"],
)
def test_node_timeout_out_of_bounds_or_not_whole_seconds_is_rejected(timeout):
    problems = problems_of(one_node(timeout=timeout))

    assert problems == {
        "nodes.load.timeout": f"must be whole seconds between 1 and 3600 (got {timeout!r})"
    }


@pytest.mark.parametrize("timeout", [1, 3600])
def test_node_timeout_at_the_bounds_is_accepted(timeout):
    parsed = parse(one_node(timeout=timeout))

    assert parsed.spec["nodes"]["load"]["timeout"] == timeout


def test_node_timeout_maximum_follows_the_setting(settings):
    settings.KEEL_MAX_TIMEOUT = 600

    problems = problems_of(one_node(timeout=601))

    assert problems == {"nodes.load.timeout": "must be whole seconds between 1 and 600 (got 601)"}
    assert parse(one_node(timeout=600)).spec["nodes"]["load"]["timeout"] == 600


@pytest.mark.parametrize("soft_timeout", [100, 120], ids=["equal", "above"])
def test_soft_timeout_not_below_timeout_is_rejected(soft_timeout):
    problems = problems_of(one_node(timeout=100, soft_timeout=soft_timeout))

    assert problems == {
        "nodes.load.soft_timeout": "must be below timeout (100) so the node can stop in time"
    }


def test_soft_timeout_is_compared_with_the_default_timeout():
    problems = problems_of(one_node(soft_timeout=30))

    assert problems == {
        "nodes.load.soft_timeout": "must be below timeout (30) so the node can stop in time"
    }


def test_soft_timeout_below_timeout_is_accepted():
    parsed = parse(one_node(timeout=120, soft_timeout=100))

    assert parsed.spec["nodes"]["load"]["soft_timeout"] == 100


@pytest.mark.parametrize("soft_timeout", [0, "10", False])
def test_soft_timeout_that_is_not_whole_seconds_is_rejected(soft_timeout):
    problems = problems_of(one_node(timeout=120, soft_timeout=soft_timeout))

    assert problems == {
        "nodes.load.soft_timeout": f"must be whole seconds between 1 and 3600 (got {soft_timeout!r})"
    }


@pytest.mark.parametrize("expected", [0, 3601, 1.5])
def test_expected_duration_out_of_bounds_is_rejected(expected):
    problems = problems_of(one_node(expected_duration=expected))

    assert list(problems) == ["nodes.load.expected_duration"]


def test_stall_after_is_kept_in_the_spec():
    parsed = parse(one_node(timeout=120, stall_after=60))

    assert parsed.spec["nodes"]["load"]["stall_after"] == 60


def test_a_node_without_stall_after_keeps_its_checksum():
    # Definitions written before stall_after existed make no new version when loaded again.
    parsed = parse(one_node(timeout=120))

    assert "stall_after" not in parsed.spec["nodes"]["load"]


@pytest.mark.parametrize("stall_after", [0, -5, 3601, 1.5, "60", True])
def test_stall_after_that_is_not_whole_seconds_in_bounds_names_node_and_field(stall_after):
    problems = problems_of(one_node(stall_after=stall_after))

    assert problems == {
        "nodes.load.stall_after": f"must be whole seconds between 1 and 3600 (got {stall_after!r})"
    }


def test_stall_after_maximum_follows_the_setting(settings):
    settings.KEEL_MAX_TIMEOUT = 7200

    assert parse(one_node(stall_after=7200)).spec["nodes"]["load"]["stall_after"] == 7200
    assert list(problems_of(one_node(stall_after=7201))) == ["nodes.load.stall_after"]


@pytest.mark.parametrize("timeout", [0, 7 * 24 * 3600 + 1, "1h", True])
def test_run_timeout_out_of_bounds_is_rejected(timeout):
    source = yaml.safe_dump(
        {"name": "Daily sales", "timeout": timeout, "nodes": {"a": {"type": "keel.noop"}}}
    )

    problems = problems_of(source)

    assert list(problems) == ["timeout"]
    assert problems["timeout"].startswith("must be whole seconds between 1 and 604800")


# --- unknown fields, name, slug ----------------------------------------------------------------


def test_unknown_top_level_field_is_named():
    problems = problems_of("name: x\nschedule: daily\nnodes: {a: {type: keel.noop}}\n")

    assert list(problems) == ["schedule"]
    assert problems["schedule"].startswith("unknown field (allowed: deploy, description, name")


def test_unknown_node_field_names_the_node_and_field():
    problems = problems_of(one_node(tiemout=10))

    assert list(problems) == ["nodes.load.tiemout"]
    assert problems["nodes.load.tiemout"].startswith("unknown field (allowed: after, ")


def test_unknown_fields_of_mixed_key_types_are_all_reported():
    # YAML keys need not be strings (1, true, null); one odd key must not hide the rest.
    problems = problems_of(
        yaml_text(
            """
            name: x
            1: one
            colour: red
            nodes:
              a: {type: keel.noop, 2: two, colour: blue}
            """
        )
    )

    assert set(problems) == {"1", "colour", "nodes.a.2", "nodes.a.colour"}


@pytest.mark.parametrize(
    "source",
    ["nodes: {a: {type: keel.noop}}\n", "name: '  '\nslug: x\nnodes: {a: {type: keel.noop}}\n"],
)
def test_missing_or_blank_name_is_rejected(source):
    problems = problems_of(source)

    assert problems["name"] == "required: a non-empty string"


def test_slug_that_is_not_lowercase_is_rejected():
    problems = problems_of("name: Daily sales\nslug: Daily Sales\nnodes: {a: {type: keel.noop}}\n")

    assert list(problems) == ["slug"]


@pytest.mark.parametrize("nodes", [None, {}, ["a", "b"]], ids=["missing", "empty", "list"])
def test_definition_without_nodes_is_rejected(nodes):
    source = yaml.safe_dump({"name": "x", **({} if nodes is None else {"nodes": nodes})})

    problems = problems_of(source)

    assert problems == {"nodes": "required: a mapping of node keys to node definitions"}


@pytest.mark.parametrize("key", ["1st", "has space", "x" * 101])
def test_node_key_that_is_not_an_identifier_is_rejected(key):
    problems = problems_of(definition(**{key: {"type": "keel.noop"}}))

    assert list(problems) == [f"nodes.{key}"]


def test_node_that_is_not_a_mapping_is_rejected():
    problems = problems_of(definition(load="keel.noop"))

    assert problems == {"nodes.load": "must be a mapping with at least 'type'"}


@pytest.mark.parametrize("source", ["", "just text\n", "- a\n- b\n"])
def test_document_that_is_not_a_mapping_is_rejected(source):
    problems = problems_of(source)

    assert problems == {"(file)": "must be a mapping with at least 'name' and 'nodes'"}


# --- pools and priority ------------------------------------------------------------------------


def test_pool_not_declared_under_pools_names_the_node_and_pool():
    problems = problems_of(one_node(pool="warehouse_db"))

    assert problems == {
        "nodes.load.pool": (
            "pool 'warehouse_db' is not declared under 'pools' (add pools: {warehouse_db: <slots>})"
        )
    }


def test_declared_pool_is_accepted_and_kept_in_the_spec():
    parsed = parse(
        yaml_text(
            """
            name: Daily sales
            pools: {warehouse_db: 2}
            nodes:
              load: {type: keel.noop, pool: warehouse_db}
            """
        )
    )

    assert parsed.spec["pools"] == {"warehouse_db": 2}
    assert parsed.spec["nodes"]["load"]["pool"] == "warehouse_db"


@pytest.mark.parametrize("pool", [["warehouse_db"], {"warehouse_db": 1}, 5])
def test_pool_that_is_not_a_name_is_rejected_not_crashing(pool):
    source = yaml.safe_dump(
        {
            "name": "x",
            "pools": {"warehouse_db": 1},
            "nodes": {"load": {"type": "keel.noop", "pool": pool}},
        }
    )

    problems = problems_of(source)

    assert list(problems) == ["nodes.load.pool"]


@pytest.mark.parametrize("slots", [0, -1, 10_001, "2", True])
def test_pool_slots_out_of_bounds_are_rejected(slots):
    source = yaml.safe_dump(
        {"name": "x", "pools": {"warehouse_db": slots}, "nodes": {"a": {"type": "keel.noop"}}}
    )

    problems = problems_of(source)

    assert problems == {
        "pools.warehouse_db": f"slots must be a whole number from 1 to 10000 (got {slots!r})"
    }


def test_pool_name_that_is_not_a_slug_is_rejected():
    problems = problems_of("name: x\npools: {Warehouse DB: 1}\nnodes: {a: {type: keel.noop}}\n")

    assert problems == {
        "pools.Warehouse DB": "pool names are lowercase letters, digits, '-' or '_'"
    }


@pytest.mark.parametrize("priority", ["urgent", "HIGH", 1, ["high"]])
def test_unknown_priority_is_rejected(priority):
    problems = problems_of(one_node(priority=priority))

    assert problems == {
        "nodes.load.priority": f"must be one of high, default, low (got {priority!r})"
    }


@pytest.mark.parametrize("priority", ["high", "default", "low"])
def test_known_priority_is_accepted(priority):
    assert parse(one_node(priority=priority)).spec["nodes"]["load"]["priority"] == priority


# --- retries -----------------------------------------------------------------------------------


def test_full_retries_block_is_kept():
    retries = {
        "max_attempts": 3,
        "backoff": 1.5,
        "factor": 2,
        "max_delay": 60,
        "jitter": False,
        "retry_on": ["ConnectionError", "TimeoutError"],
    }

    parsed = parse(one_node(retries=retries))

    assert parsed.spec["nodes"]["load"]["retries"] == retries


def test_retries_given_as_a_number_means_max_attempts():
    parsed = parse(one_node(retries=4))

    assert parsed.spec["nodes"]["load"]["retries"]["max_attempts"] == 4


@pytest.mark.parametrize(
    ("retries", "path"),
    [
        ({"max_attempts": 0}, "nodes.load.retries.max_attempts"),
        ({"max_attempts": 21}, "nodes.load.retries.max_attempts"),
        ({"max_attempts": True}, "nodes.load.retries.max_attempts"),
        ({"max_attempts": 2.5}, "nodes.load.retries.max_attempts"),
        ({"backoff": -1}, "nodes.load.retries.backoff"),
        ({"backoff": "5s"}, "nodes.load.retries.backoff"),
        ({"factor": True}, "nodes.load.retries.factor"),
        ({"max_delay": 86401}, "nodes.load.retries.max_delay"),
        ({"jitter": "yes please"}, "nodes.load.retries.jitter"),
        ({"jitter": 1}, "nodes.load.retries.jitter"),
        ({"retry_on": "ConnectionError"}, "nodes.load.retries.retry_on"),
        ({"retry_on": ["not an identifier"]}, "nodes.load.retries.retry_on"),
        ({"retry_on": [42]}, "nodes.load.retries.retry_on"),
        ({"attempts": 3}, "nodes.load.retries.attempts"),
        (0, "nodes.load.retries.max_attempts"),
        (True, "nodes.load.retries"),
        ("three", "nodes.load.retries"),
    ],
)
def test_bad_retries_name_the_field(retries, path):
    problems = problems_of(one_node(retries=retries))

    assert list(problems) == [path]


@pytest.mark.parametrize("field", ["backoff", "factor", "max_delay"])
def test_retry_delay_that_is_not_a_number_is_rejected(field):
    # NaN compares false with every bound, so a range check alone lets it through.
    problems = problems_of(one_node(retries={field: float("nan")}))

    assert problems == {f"nodes.load.retries.{field}": "must be a number from 0 to 86400"}


# --- many problems at once ---------------------------------------------------------------------


def test_all_problems_are_reported_at_once():
    source = yaml_text(
        """
        slug: Bad Slug
        nodes:
          extract:
            type: test.record
            params: {value: ten}
            timeout: 0
          transform:
            type: sales.nope
            after: [extract, missing]
          load:
            type: keel.noop
            pool: warehouse_db
            priority: urgent
            retries: {max_attempts: 50}
        """
    )

    with pytest.raises(DefinitionError) as caught:
        parse(source, source_name="sales.yaml")

    paths = [path for path, _ in caught.value.problems]
    assert set(paths) == {
        "name",
        "slug",
        "nodes.extract.params.value",
        "nodes.extract.timeout",
        "nodes.transform.type",
        "nodes.transform.after",
        "nodes.load.pool",
        "nodes.load.priority",
        "nodes.load.retries.max_attempts",
    }
    message = str(caught.value)
    assert message.startswith("sales.yaml is not a valid workflow definition:")
    for path in paths:
        assert f"  - {path}: " in message


def test_error_carries_the_source_name():
    with pytest.raises(DefinitionError) as caught:
        parse("name: x\n", source_name="flows/daily.yaml")

    assert caught.value.source_name == "flows/daily.yaml"
    assert "flows/daily.yaml" in str(caught.value)


# --- YAML and JSON syntax ----------------------------------------------------------------------


def test_bad_yaml_reports_line_and_column():
    source = yaml_text(
        """
        name: Daily sales
        nodes:
          extract: {type: keel.noop
          load: {type: keel.noop}
        """
    )

    problems = problems_of(source)

    assert list(problems) == ["(file)"]
    assert problems["(file)"].startswith("not valid YAML or JSON at line 4, column")


def test_bad_indentation_reports_its_line():
    problems = problems_of("name: Daily sales\n  oops: 1\nnodes: {}\n")

    assert problems["(file)"].startswith("not valid YAML or JSON at line 2, column")


def test_bad_json_reports_its_line():
    problems = problems_of(
        '{\n  "name": "Daily sales",\n  "nodes": {\n    "a": {"type": "keel.noop"},,\n  }\n}\n'
    )

    assert "line 4" in problems["(file)"]


def test_json_definition_is_accepted():
    document = {
        "name": "Daily sales",
        "pools": {"warehouse_db": 1},
        "nodes": {
            "extract": {"type": "test.record", "params": {"value": 2}},
            "load": {"type": "keel.noop", "after": ["extract"], "pool": "warehouse_db"},
        },
    }

    parsed = parse(json.dumps(document, indent=2), source_name="sales.json")

    assert parsed.slug == "daily-sales"
    assert parsed.spec["nodes"]["load"]["after"] == ["extract"]
    assert parsed.checksum == parse(yaml.safe_dump(document)).checksum


def test_json_on_one_line_is_accepted():
    parsed = parse('{"name": "Daily sales", "nodes": {"a": {"type": "keel.noop"}}}')

    assert list(parsed.spec["nodes"]) == ["a"]


def test_json_indented_with_tabs_is_accepted():
    source = json.dumps({"name": "Daily sales", "nodes": {"a": {"type": "keel.noop"}}}, indent="\t")

    assert parse(source).slug == "daily-sales"


def test_duplicate_node_key_is_rejected():
    source = yaml_text(
        """
        name: Daily sales
        nodes:
          load: {type: keel.noop}
          load: {type: test.record}
        """
    )

    with pytest.raises(DefinitionError):
        parse(source)


@pytest.mark.parametrize(
    "source",
    [
        "name: x\nparams: {day: 2024-01-01}\nnodes: {a: {type: keel.noop}}\n",
        "name: x\nparams: {ratio: .nan}\nnodes: {a: {type: keel.noop}}\n",
        "name: x\nnodes: {a: {type: keel.sleep, params: {seconds: .nan}}}\n",
        "name: x\nnodes: {a: {type: keel.sleep, params: {seconds: .inf}}}\n",
    ],
    ids=["date-run-param", "nan-run-param", "nan-float-param", "inf-float-param"],
)
def test_value_that_json_cannot_hold_is_rejected(source):
    with pytest.raises(DefinitionError):
        parse(source)


# --- checksum: content, not formatting ---------------------------------------------------------


def test_checksum_ignores_comments_whitespace_key_order_and_style():
    plain = yaml_text(
        """
        name: Daily sales
        pools: {warehouse_db: 1}
        nodes:
          extract: {type: test.record, params: {value: 1, sleep: 0.5}}
          load: {type: keel.noop, after: [extract], pool: warehouse_db}
        """
    )
    reformatted = yaml_text(
        """
        # Daily sales: owned by the data team.
        nodes:

          extract:
            params:
              sleep: 0.5     # seconds
              value: 1
            type: test.record

          load:
            pool:    warehouse_db
            after: extract   # a single name is a list of one
            type: keel.noop
        pools:
          warehouse_db: 1
        name: "Daily sales"
        """
    )

    assert parse(plain).checksum == parse(reformatted).checksum


def test_checksum_counts_defaults_as_written_out():
    assert (
        parse(one_node()).checksum
        == parse(one_node(timeout=30, retries={"max_attempts": 1})).checksum
    )


@pytest.mark.parametrize(
    "change",
    [
        {"timeout": 31},
        {"params": {"value": 2}},
        {"priority": "high"},
        {"retries": {"max_attempts": 2}},
        {"description": "now documented"},
    ],
)
def test_checksum_changes_with_content(change):
    base = {"type": "test.record", "params": {"value": 1}}

    assert (
        parse(definition(load=base)).checksum != parse(definition(load={**base, **change})).checksum
    )


def test_checksum_is_sha256_of_the_normalised_spec():
    parsed = parse(one_node())

    assert len(parsed.checksum) == 64
    assert parsed.checksum == spec.checksum(json.loads(json.dumps(parsed.spec)))


# --- the demo definitions ----------------------------------------------------------------------


def test_demo_definitions_exist():
    assert len(DEMO_FILES) >= 3


@pytest.mark.parametrize("path", DEMO_FILES, ids=[path.stem for path in DEMO_FILES])
def test_demo_definition_is_valid(path):
    raw = yaml.safe_load(path.read_text())

    parsed = parse(path.read_text(), source_name=str(path))

    assert parsed.slug == raw["slug"]
    assert list(parsed.spec["nodes"]) == list(raw["nodes"])
    assert graph.find_cycle(parsed.spec["nodes"]) == []
    assert len(graph.topological_order(parsed.spec)) == len(raw["nodes"])
