"""Parse and validate workflow definitions (YAML or JSON) into a normalised spec.

A definition is checked completely before anything is written; every problem is
reported with the path of the field it concerns (``nodes.load.after``), so a user
can fix them all in one go. Nothing in a definition is evaluated.
"""

import hashlib
import json
import math
import re
from dataclasses import dataclass

import yaml
from django.conf import settings
from django.utils.text import slugify

from workflows import registry

PRIORITIES = ("high", "default", "low")
NODE_KEY_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,99}$")
POOL_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,99}$")
TOP_LEVEL_FIELDS = {"name", "slug", "description", "timeout", "params", "pools", "nodes"}
NODE_FIELDS = {
    "type",
    "params",
    "after",
    "timeout",
    "soft_timeout",
    "expected_duration",
    "stall_after",
    "retries",
    "pool",
    "priority",
    "description",
}
RETRY_FIELDS = {"max_attempts", "backoff", "factor", "max_delay", "jitter", "retry_on"}
MAX_ATTEMPTS = 20
MAX_RUN_TIMEOUT = 7 * 24 * 3600


class DefinitionError(ValueError):
    """A definition that cannot become a version. ``problems`` lists (field path, message)."""

    def __init__(self, problems: list[tuple[str, str]], source_name: str = "definition"):
        self.problems = problems
        self.source_name = source_name
        lines = "\n".join(f"  - {path}: {message}" for path, message in problems)
        super().__init__(f"{source_name} is not a valid workflow definition:\n{lines}")


@dataclass(frozen=True)
class Definition:
    spec: dict
    source: str
    checksum: str

    @property
    def slug(self) -> str:
        return self.spec["slug"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping naming the same key twice.

    Plain YAML keeps the last of two equal keys, which would silently drop a node.
    """


def _construct_unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} appears twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _reject_duplicate_json_keys(pairs):
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"the key {duplicates[0]!r} appears twice in one object")
    return dict(pairs)


def _load(source: str):
    """JSON first when it looks like JSON (YAML rejects JSON's tab indentation), else YAML."""
    if source.lstrip().startswith("{"):
        try:
            return json.loads(source, object_pairs_hook=_reject_duplicate_json_keys)
        except json.JSONDecodeError as error:
            raise DefinitionError(
                [
                    (
                        "(file)",
                        f"not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}",
                    )
                ]
            ) from None
        except ValueError as error:
            raise DefinitionError([("(file)", f"not valid: {error}")]) from None
    return yaml.load(source, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe


def parse(source: str, *, source_name: str = "definition") -> Definition:
    """Parse YAML or JSON text and validate it into a normalised spec."""
    try:
        raw = _load(source)
    except DefinitionError as error:
        raise DefinitionError(error.problems, source_name) from None
    except yaml.YAMLError as error:
        where = ""
        mark = getattr(error, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(error, "problem", None) or str(error)
        raise DefinitionError(
            [("(file)", f"not valid YAML or JSON{where}: {problem}")], source_name
        ) from None
    spec = validate(raw, source_name=source_name)
    return Definition(spec=spec, source=source, checksum=checksum(spec))


def _json_problems(path: str, value) -> list[tuple[str, str]]:
    """Values strict JSON cannot hold (dates, NaN, infinity…), each with its path."""
    if isinstance(value, dict):
        return [
            problem
            for key, item in value.items()
            for problem in _json_problems(f"{path}.{key}", item)
        ]
    if isinstance(value, list):
        return [
            problem
            for index, item in enumerate(value)
            for problem in _json_problems(f"{path}[{index}]", item)
        ]
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, f"{value} is not a number JSON can hold")]
    if value is None or isinstance(value, str | int | float | bool):
        return []
    return [
        (
            path,
            f"must be a JSON value (string, number, boolean, list or mapping), got {type(value).__name__} {value!r}; quote it to make it a string",
        )
    ]


def checksum(spec: dict) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def validate(raw, *, source_name: str = "definition") -> dict:
    problems: list[tuple[str, str]] = []
    if not isinstance(raw, dict):
        raise DefinitionError(
            [("(file)", "must be a mapping with at least 'name' and 'nodes'")], source_name
        )

    for key in sorted(set(raw) - TOP_LEVEL_FIELDS, key=str):
        problems.append(
            (str(key), f"unknown field (allowed: {', '.join(sorted(TOP_LEVEL_FIELDS))})")
        )

    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(("name", "required: a non-empty string"))
        name = ""
    slug = raw.get("slug", slugify(name))
    if not isinstance(slug, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_\-]{0,99}", slug or ""):
        problems.append(
            (
                "slug",
                "must be lowercase letters, digits, '-' or '_' (or omitted to derive it from name)",
            )
        )
    description = raw.get("description", "")
    if not isinstance(description, str):
        problems.append(("description", "must be a string"))

    run_timeout = raw.get("timeout")
    if run_timeout is not None and not _is_int_between(run_timeout, 1, MAX_RUN_TIMEOUT):
        problems.append(
            (
                "timeout",
                f"must be whole seconds between 1 and {MAX_RUN_TIMEOUT} (got {run_timeout!r})",
            )
        )

    run_params = raw.get("params", {})
    if not isinstance(run_params, dict):
        problems.append(("params", "must be a mapping of run parameter names to default values"))
        run_params = {}

    pools = raw.get("pools", {})
    if not isinstance(pools, dict):
        problems.append(("pools", "must be a mapping of pool names to slot counts"))
        pools = {}
    for pool_name, slots in pools.items():
        if not isinstance(pool_name, str) or not POOL_NAME_PATTERN.match(pool_name):
            problems.append(
                (f"pools.{pool_name}", "pool names are lowercase letters, digits, '-' or '_'")
            )
        if not _is_int_between(slots, 1, 10_000):
            problems.append(
                (
                    f"pools.{pool_name}",
                    f"slots must be a whole number from 1 to 10000 (got {slots!r})",
                )
            )

    nodes_raw = raw.get("nodes")
    nodes: dict[str, dict] = {}
    if not isinstance(nodes_raw, dict) or not nodes_raw:
        problems.append(("nodes", "required: a mapping of node keys to node definitions"))
    else:
        for key, node_raw in nodes_raw.items():
            node, node_problems = _validate_node(str(key), node_raw, pools)
            problems.extend(node_problems)
            if node is not None:
                nodes[str(key)] = node
        problems.extend(_check_graph(nodes))
    problems.extend(_json_problems("params", run_params))
    for key, node in nodes.items():
        problems.extend(_json_problems(f"nodes.{key}.params", node["params"]))

    if problems:
        raise DefinitionError(problems, source_name)

    return {
        "name": name.strip(),
        "slug": slug,
        "description": description,
        "timeout": run_timeout,
        "params": run_params,
        "pools": pools,
        "nodes": nodes,
        # PostgreSQL's jsonb does not keep key order; the order nodes were written in is kept here.
        "order": list(nodes),
    }


def _validate_node(key: str, raw, pools: dict) -> tuple[dict | None, list[tuple[str, str]]]:
    path = f"nodes.{key}"
    problems: list[tuple[str, str]] = []
    if not NODE_KEY_PATTERN.match(key):
        problems.append(
            (
                path,
                "node keys start with a letter and use letters, digits, '_' or '-' (at most 100)",
            )
        )
    if not isinstance(raw, dict):
        return None, [*problems, (path, "must be a mapping with at least 'type'")]

    for field_name in sorted(set(raw) - NODE_FIELDS, key=str):
        problems.append(
            (f"{path}.{field_name}", f"unknown field (allowed: {', '.join(sorted(NODE_FIELDS))})")
        )

    type_name = raw.get("type")
    params = raw.get("params", {})
    if not isinstance(params, dict):
        problems.append((f"{path}.params", "must be a mapping"))
        params = {}
    if not isinstance(type_name, str) or not type_name:
        problems.append((f"{path}.type", "required: the name of a registered node type"))
    elif not registry.is_registered(type_name):
        problems.append((f"{path}.type", f"no node type named {type_name!r} is registered"))
    else:
        for param, message in registry.get(type_name).check_params(params).items():
            problems.append((f"{path}.params.{param}", message))

    after = raw.get("after", [])
    if isinstance(after, str):
        after = [after]
    if not isinstance(after, list) or not all(isinstance(item, str) for item in after):
        problems.append((f"{path}.after", "must be a list of node keys"))
        after = []
    elif len(set(after)) != len(after):
        problems.append((f"{path}.after", "names the same node twice"))

    max_timeout = settings.KEEL_MAX_TIMEOUT
    timeout = raw.get("timeout", settings.KEEL_DEFAULT_TIMEOUT)
    if not _is_int_between(timeout, 1, max_timeout):
        problems.append(
            (
                f"{path}.timeout",
                f"must be whole seconds between 1 and {max_timeout} (got {timeout!r})",
            )
        )
        timeout = None
    soft_timeout = raw.get("soft_timeout")
    if soft_timeout is not None:
        if not _is_int_between(soft_timeout, 1, max_timeout):
            problems.append(
                (
                    f"{path}.soft_timeout",
                    f"must be whole seconds between 1 and {max_timeout} (got {soft_timeout!r})",
                )
            )
        elif timeout is not None and soft_timeout >= timeout:
            problems.append(
                (
                    f"{path}.soft_timeout",
                    f"must be below timeout ({timeout}) so the node can stop in time",
                )
            )
    expected = raw.get("expected_duration")
    if expected is not None and not _is_int_between(expected, 1, max_timeout):
        problems.append(
            (f"{path}.expected_duration", f"must be whole seconds between 1 and {max_timeout}")
        )

    stall_after = raw.get("stall_after")
    if stall_after is not None and not _is_int_between(stall_after, 1, max_timeout):
        problems.append(
            (
                f"{path}.stall_after",
                f"must be whole seconds between 1 and {max_timeout} (got {stall_after!r})",
            )
        )

    retries, retry_problems = _validate_retries(path, raw.get("retries", {}))
    problems.extend(retry_problems)

    pool = raw.get("pool", "")
    if pool and (not isinstance(pool, str) or pool not in pools):
        problems.append(
            (
                f"{path}.pool",
                f"pool {pool!r} is not declared under 'pools' (add pools: {{{pool}: <slots>}})",
            )
        )
    priority = raw.get("priority")
    if priority is not None and priority not in PRIORITIES:
        problems.append(
            (f"{path}.priority", f"must be one of {', '.join(PRIORITIES)} (got {priority!r})")
        )
    description = raw.get("description", "")
    if not isinstance(description, str):
        problems.append((f"{path}.description", "must be a string"))

    node = {
        "type": type_name,
        "params": params,
        "after": after,
        "timeout": timeout,
        "soft_timeout": soft_timeout,
        "expected_duration": expected,
        "retries": retries,
        "pool": pool or "",
        "priority": priority,
        "description": description,
    }
    # Only when declared: the checksum of a definition that does not use it stays the same,
    # so loading it again makes no new version.
    if stall_after is not None:
        node["stall_after"] = stall_after
    return node, problems


def _validate_retries(path: str, raw) -> tuple[dict, list[tuple[str, str]]]:
    problems: list[tuple[str, str]] = []
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = {"max_attempts": raw}
    if not isinstance(raw, dict):
        return {}, [
            (
                f"{path}.retries",
                "must be a mapping (max_attempts, backoff, factor, max_delay, jitter, retry_on)",
            )
        ]
    for field_name in sorted(set(raw) - RETRY_FIELDS, key=str):
        problems.append(
            (
                f"{path}.retries.{field_name}",
                f"unknown field (allowed: {', '.join(sorted(RETRY_FIELDS))})",
            )
        )
    retries = {
        "max_attempts": raw.get("max_attempts", 1),
        "backoff": raw.get("backoff", 5),
        "factor": raw.get("factor", 2),
        "max_delay": raw.get("max_delay", 300),
        "jitter": raw.get("jitter", True),
        "retry_on": raw.get("retry_on", []),
    }
    if not _is_int_between(retries["max_attempts"], 1, MAX_ATTEMPTS):
        problems.append(
            (f"{path}.retries.max_attempts", f"must be a whole number from 1 to {MAX_ATTEMPTS}")
        )
    for name in ("backoff", "factor", "max_delay"):
        value = retries[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 <= value <= 86400  # written so that NaN fails too
        ):
            problems.append((f"{path}.retries.{name}", "must be a number from 0 to 86400"))
    if not isinstance(retries["jitter"], bool):
        problems.append((f"{path}.retries.jitter", "must be true or false"))
    retry_on = retries["retry_on"]
    if not isinstance(retry_on, list) or not all(
        isinstance(item, str) and item.isidentifier() for item in retry_on
    ):
        problems.append(
            (
                f"{path}.retries.retry_on",
                "must be a list of exception class names, e.g. [ConnectionError, TimeoutError]",
            )
        )
    return retries, problems


def _check_graph(nodes: dict[str, dict]) -> list[tuple[str, str]]:
    problems = []
    for key, node in nodes.items():
        for upstream in node["after"]:
            if upstream == key:
                problems.append((f"nodes.{key}.after", "a node cannot run after itself"))
            elif upstream not in nodes:
                problems.append(
                    (
                        f"nodes.{key}.after",
                        f"names {upstream!r}, which is not a node of this workflow",
                    )
                )
    if problems:
        return problems
    cycle = find_cycle(nodes)
    if cycle:
        first = cycle[0]
        problems.append((f"nodes.{first}.after", f"cycle: {' -> '.join(cycle)}"))
    return problems


def find_cycle(nodes: dict[str, dict]) -> list[str]:
    """Return one cycle as [a, b, ..., a], or [] when the graph is a DAG.

    1. Peel off nodes with no remaining upstreams (Kahn); what is left lies on or
       behind a cycle.
    2. From any leftover node, follow ``after`` links among leftovers until a node
       repeats: the path from its first visit is a cycle.
    """
    ordered = set(topological_order({"nodes": nodes}))
    leftover = [key for key in nodes if key not in ordered]
    if not leftover:
        return []
    path: list[str] = []
    seen: dict[str, int] = {}
    key = leftover[0]
    while key not in seen:
        seen[key] = len(path)
        path.append(key)
        key = next(upstream for upstream in nodes[key]["after"] if upstream not in ordered)
    cycle = [*path[seen[key] :], key]
    # Written as "a -> b" meaning "b runs after a".
    return list(reversed(cycle))


def node_keys(spec: dict) -> list[str]:
    """The node keys in the order the definition wrote them."""
    return spec.get("order") or list(spec["nodes"])


def downstream_map(spec: dict) -> dict[str, list[str]]:
    """node key -> keys of the nodes that list it in ``after``, in definition order."""
    downstream: dict[str, list[str]] = {key: [] for key in node_keys(spec)}
    for key in node_keys(spec):
        for upstream in spec["nodes"][key]["after"]:
            downstream[upstream].append(key)
    return downstream


def topological_order(spec: dict) -> list[str]:
    nodes = spec["nodes"]
    remaining = {key: len(nodes[key]["after"]) for key in node_keys(spec)}
    downstream = downstream_map(spec)
    ready = [key for key, count in remaining.items() if count == 0]
    order = []
    while ready:
        key = ready.pop(0)
        order.append(key)
        for child in downstream[key]:
            remaining[child] -= 1
            if remaining[child] == 0:
                ready.append(child)
    return order


def _is_int_between(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
