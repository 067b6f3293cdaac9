"""Hostile or mistaken definitions are refused cheaply, each with the place it went wrong."""

import json
from pathlib import Path

import pytest
import yaml

from workflows.definitions import graph, limits, params, spec, versioning
from workflows.definitions.spec import DefinitionError, parse

DEMO_DIR = Path(spec.__file__).resolve().parents[1] / "demo_definitions"

# Computed with the hand-written validator this one replaced: a reload stays "unchanged".
DEMO_CHECKSUMS = {
    "fan_out.yaml": "62652b4ec497223757907760665e61accea03f61fca1a9bb11d513c4635d4b82",
    "flaky_and_slow.yaml": "4d0c3360baaa302283ac35463dca12c018b649097d6742d4c8847c458ca360a7",
    "needs_fix.yaml": "cbf4fd431334b0a471d0f604116f421b20d96180f2a620332fecbe908779a76e",
    "sales_etl.yaml": "5d36de3a2ef754639299ece97f1e38b70a97bf7dad592503e7c081ba3da9275b",
}

ALIAS_BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
name: bomb
nodes: {a: {type: keel.noop, params: {x: *i}}}
"""


def problems_of(source: str) -> dict[str, str]:
    with pytest.raises(DefinitionError) as caught:
        parse(source, source_name="test.yaml")
    return dict(caught.value.problems)


def with_params(params: dict) -> dict:
    """A definition declaring ``params`` as its run params (they take any value)."""
    return {"name": "x", "params": params, "nodes": {"a": {"type": "keel.noop"}}}


@pytest.mark.parametrize("name", sorted(DEMO_CHECKSUMS))
def test_demo_definitions_keep_the_checksums_of_the_old_validator(name):
    assert parse((DEMO_DIR / name).read_text()).checksum == DEMO_CHECKSUMS[name]


def test_every_demo_definition_has_a_recorded_checksum():
    assert sorted(path.name for path in DEMO_DIR.glob("*.yaml")) == sorted(DEMO_CHECKSUMS)


# --- YAML ----------------------------------------------------------------------------------------


def test_alias_bomb_is_refused_before_anything_expands():
    problems = problems_of(ALIAS_BOMB)

    assert list(problems) == ["(file)"]
    assert problems["(file)"].startswith("YAML anchors and aliases are not allowed (line 1,")


def test_an_anchor_alone_is_refused():
    problems = problems_of("name: &n x\nnodes: {a: {type: keel.noop}}\n")

    assert problems["(file)"].startswith("YAML anchors and aliases are not allowed (line 1,")


def test_a_merge_key_is_refused_as_it_needs_an_alias():
    source = "name: x\nbase: &b {type: keel.noop}\nnodes: {a: {<<: *b}}\n"

    assert "anchors and aliases" in problems_of(source)["(file)"]


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "block"])
def test_yaml_nested_too_deeply_is_refused_without_a_traceback(flow):
    if flow:
        source = (
            "name: x\nnodes: {a: {type: keel.noop, params: {x: " + "[" * 5000 + "]" * 5000 + "}}}\n"
        )
    else:
        source = (
            "name: x\nnodes:\n  a:\n    type: keel.noop\n    params:\n"
            + "".join("  " * (level + 3) + f"k{level}:\n" for level in range(30))
            + "  " * 33
            + "leaf: 1\n"
        )

    problems = problems_of(source)

    assert list(problems) == ["(file)"]
    assert problems["(file)"].startswith(f"nested more than {limits.MAX_DEPTH} levels deep (line")


def test_nesting_within_the_limit_is_accepted():
    params = {"x": 1}
    for _ in range(limits.MAX_DEPTH - 2):  # the document, params, then these
        params = {"x": params}

    parse(yaml.safe_dump(with_params(params)))


def test_huge_yaml_integer_is_refused_without_a_traceback():
    problems = problems_of(
        "name: x\nnodes: {a: {type: keel.noop, params: {n: " + "9" * 5000 + "}}}\n"
    )

    assert problems["(file)"].startswith("integer 99999999999999999999… is beyond 64 bits")


def test_integer_just_beyond_64_bits_names_its_path():
    problems = problems_of(yaml.safe_dump(with_params({"n": 2**63})))

    assert problems == {"params.n": f"integer is beyond 64 bits (at most {2**63 - 1})"}


def test_largest_64_bit_integer_is_accepted():
    assert parse(yaml.safe_dump(with_params({"n": 2**63 - 1}))).spec["params"] == {"n": 2**63 - 1}


def test_nul_byte_in_the_file_is_refused():
    problems = problems_of("name: x\nnodes: {a: {type: keel.noop}}\ndescription: a\x00b\n")

    assert problems == {"(file)": "contains a NUL byte (line 3); remove it"}


@pytest.mark.parametrize(
    ("source", "path"),
    [
        ('name: "a\\0b"\nnodes: {a: {type: keel.noop}}\n', "name"),
        ('name: x\nnodes: {a: {type: keel.noop, params: {"k\\0": 1}}}\n', "nodes.a.params.k\x00"),
        (json.dumps(with_params({"s": "a\x00b"})), "params.s"),
    ],
    ids=["yaml-escape", "yaml-key", "json-escape"],
)
def test_nul_character_written_as_an_escape_names_its_path(source, path):
    problems = problems_of(source)

    assert list(problems) == [path]
    assert "NUL" in problems[path]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_number_in_params_names_its_path(value):
    problems = problems_of(
        f"name: x\nnodes: {{a: {{type: keel.sleep, params: {{seconds: {value}}}}}}}\n"
    )

    assert list(problems) == ["nodes.a.params.seconds"]
    assert problems["nodes.a.params.seconds"].endswith("is not a number JSON can hold")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "1e999"])
def test_non_finite_json_number_names_its_path(constant):
    source = '{"name": "x", "params": {"r": CONSTANT}, "nodes": {"a": {"type": "keel.noop"}}}'
    source = source.replace("CONSTANT", constant)

    problems = problems_of(source)

    assert list(problems) == ["params.r"]


def test_nan_in_a_field_names_the_field():
    problems = problems_of('{"name": "x", "nodes": {"a": {"type": "keel.noop", "timeout": NaN}}}')

    assert problems == {"nodes.a.timeout": "must be whole seconds between 1 and 3600 (got nan)"}


# --- sizes ---------------------------------------------------------------------------------------


def test_file_over_the_limit_is_refused_stating_the_limit():
    source = "name: x\nnodes: {a: {type: keel.noop}}\n" + "#" * limits.MAX_FILE_BYTES + "\n"

    problems = problems_of(source)

    assert problems["(file)"].endswith(f"definitions are limited to {limits.MAX_FILE_BYTES} bytes")


@pytest.mark.django_db
def test_load_file_reads_no_more_than_the_limit(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: x\nnodes: {a: {type: keel.noop}}\n" + "#" * 2 * limits.MAX_FILE_BYTES)

    with pytest.raises(DefinitionError) as caught:
        versioning.load_file(path, actor="test")

    assert f"limited to {limits.MAX_FILE_BYTES} bytes" in str(caught.value)


def test_too_many_nodes_are_refused():
    nodes = {f"n{index}": {"type": "keel.noop"} for index in range(limits.MAX_NODES + 1)}

    problems = problems_of(json.dumps({"name": "x", "nodes": nodes}))

    assert problems == {
        "nodes": f"has {limits.MAX_NODES + 1} nodes; at most {limits.MAX_NODES} are allowed"
    }


def test_the_most_nodes_allowed_are_accepted():
    nodes = {f"n{index}": {"type": "keel.noop"} for index in range(limits.MAX_NODES)}

    assert len(parse(json.dumps({"name": "x", "nodes": nodes})).spec["order"]) == limits.MAX_NODES


def test_long_string_names_its_path():
    problems = problems_of(
        yaml.safe_dump(
            {"name": "x", "description": "d" * 10_001, "nodes": {"a": {"type": "keel.noop"}}}
        )
    )

    assert problems == {"description": "is 10001 characters long; at most 10000 are allowed"}


def test_params_over_the_limit_are_refused():
    params = {f"k{index}": "v" * 9_000 for index in range(8)}

    problems = problems_of(json.dumps(with_params(params)))

    assert list(problems) == ["params"]
    assert problems["params"].endswith(f"at most {limits.MAX_PARAMS_BYTES} are allowed")


# --- graph and paths -----------------------------------------------------------------------------


def test_three_node_cycle_names_every_node_in_run_order():
    problems = problems_of(
        json.dumps(
            {
                "name": "x",
                "nodes": {
                    "a": {"type": "keel.noop", "after": ["c"]},
                    "b": {"type": "keel.noop", "after": ["a"]},
                    "c": {"type": "keel.noop", "after": ["b"]},
                },
            }
        )
    )

    assert problems == {"nodes.a.after": "cycle: a -> b -> c -> a"}


def test_topological_order_puts_upstreams_first_then_definition_order():
    nodes = {
        "load": {"after": ["transform"]},
        "extract": {"after": []},
        "transform": {"after": ["extract", "audit"]},
        "audit": {"after": []},
    }

    assert graph.topological_order({"nodes": nodes}) == ["extract", "audit", "transform", "load"]


def test_error_message_lists_each_problem_with_its_dotted_path():
    source = yaml.safe_dump(
        {"name": "x", "nodes": {"load": {"type": "keel.noop", "retries": {"max_attempts": 21}}}}
    )

    with pytest.raises(DefinitionError) as caught:
        parse(source, source_name="x.yaml")

    assert "  - nodes.load.retries.max_attempts: must be a whole number from 1 to 20" in str(
        caught.value
    )


# --- run params ----------------------------------------------------------------------------------

DECLARED = {"n": 5, "ratio": 0.5, "day": "2026-01-01", "dry": False, "tags": [], "opts": {}}


@pytest.mark.parametrize(
    ("given", "path", "message"),
    [
        ({"n": "five"}, "params.n", 'expected an integer (the default is 5), got "five"'),
        ({"n": True}, "params.n", "expected an integer (the default is 5), got true"),
        ({"n": 1.5}, "params.n", "expected an integer (the default is 5), got 1.5"),
        ({"ratio": "1"}, "params.ratio", 'expected a number (the default is 0.5), got "1"'),
        ({"day": 3}, "params.day", 'expected a string (the default is "2026-01-01"), got 3'),
        ({"dry": 0}, "params.dry", "expected true or false (the default is false), got 0"),
        ({"tags": {}}, "params.tags", "expected a list (the default is []), got {}"),
        ({"opts": []}, "params.opts", "expected a JSON object (the default is {}), got []"),
        ({"day": "a\x00"}, "params.day", "contains a NUL (\\u0000) character"),
        ({"n": 2**64}, "params.n", f"integer is beyond 64 bits (at most {2**63 - 1})"),
        ({"ratio": float("inf")}, "params.ratio", "inf is not a number JSON can hold"),
    ],
)
def test_run_params_must_have_their_defaults_type(given, path, message):
    assert params.run_param_problems(DECLARED, given) == [(path, message)]


def test_run_params_of_the_right_types_pass():
    given = {"n": 7, "ratio": 2, "day": "x", "dry": True, "tags": ["a"], "opts": {"k": 1}}

    assert params.run_param_problems(DECLARED, given) == []


def test_a_null_default_accepts_any_value():
    assert params.run_param_problems({"anything": None}, {"anything": [1, "two"]}) == []


@pytest.mark.django_db
def test_engine_refuses_a_run_param_of_the_wrong_type_and_writes_nothing(make_version):
    from workflows import engine
    from workflows.models import Run

    version = make_version({"name": "P", "params": {"n": 5}, "nodes": {"a": {"type": "keel.noop"}}})

    with pytest.raises(engine.RunParamsError) as caught:
        engine.start_run(version, params={"n": "five"}, trigger="t")

    assert str(caught.value) == 'params.n: expected an integer (the default is 5), got "five"'
    assert not Run.objects.exists()
    assert engine.start_run(version, params={"n": 6}, trigger="t").params == {"n": 6}
