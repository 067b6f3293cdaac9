"""Parse and validate workflow definitions (YAML or JSON) into a normalised spec.

A definition is checked completely before anything is written; every problem is
reported with the path of the field it concerns (``nodes.load.after``), so a user
can fix them all in one go. Nothing in a definition is evaluated.

Checking happens in three steps:

1. Loading: a size limit on the text, no NUL bytes, no YAML anchors or aliases, a
   nesting limit enforced while composing (so a hostile file never expands or recurses).
2. Limits on the loaded document: node count, string length, integers within 64 bits.
3. The schema: the pydantic models below, then node-type params and the graph
   (``graphlib``), which need the whole definition.
"""

import graphlib
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any

import yaml
from django.conf import settings
from django.utils.text import slugify
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from workflows.definitions import registry

PRIORITIES = ("high", "default", "low")
NODE_KEY_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,99}$")
POOL_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,99}$")
SLUG_PATTERN = re.compile(r"[a-z0-9][a-z0-9_\-]{0,99}")
MAX_ATTEMPTS = 20
MAX_RUN_TIMEOUT = 7 * 24 * 3600

# Limits that keep a hostile or mistaken definition cheap to refuse.
MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_SPEC_BYTES = 8 * 1024 * 1024  # the normalised spec as JSON (defaults written out)
MAX_DEPTH = 20  # nested mappings and lists, the document itself being level 1
MAX_NODES = 5000
MAX_STRING_CHARS = 10_000
MAX_PARAMS_BYTES = 64 * 1024  # run params, and each node's params, as JSON
MAX_INT = 2**63 - 1  # what PostgreSQL's bigint and most JSON readers hold
_MAX_INT_DIGITS = 25  # longer digit strings are refused before int() converts them


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


# --- 1. Loading ---------------------------------------------------------------------------------


class _Refused(yaml.YAMLError):
    """Valid YAML that Keel does not accept (anchors, deep nesting, huge integers)."""

    def __init__(self, message: str, mark):
        super().__init__(message)
        self.message = message
        self.mark = mark


class _SafeLoader(yaml.SafeLoader):
    """A safe loader that refuses anchors and aliases, deep nesting and repeated keys.

    Aliases are refused rather than capped: a definition never needs them, and refusing
    them while composing means an alias bomb costs nothing. Plain YAML keeps the last of
    two equal keys, which would silently drop a node.
    """

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused("YAML anchors and aliases are not allowed", event.start_mark)
        collection = isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent)
        if collection:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            if collection:
                self._depth -= 1

    def construct_yaml_int(self, node):
        digits = str(node.value).lstrip("+-").replace("_", "")
        if len(digits) > _MAX_INT_DIGITS:
            raise _Refused(
                f"integer {node.value[:20]}… is beyond 64 bits (at most {MAX_INT})",
                node.start_mark,
            )
        return super().construct_yaml_int(node)


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


_SafeLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)
_SafeLoader.add_constructor("tag:yaml.org,2002:int", _SafeLoader.construct_yaml_int)


def _reject_duplicate_json_keys(pairs):
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"the key {duplicates[0]!r} appears twice in one object")
    return dict(pairs)


def _parse_json_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"integer {text[:20]}… is beyond 64 bits (at most {MAX_INT})")
    return int(text)


def _load(source: str):
    """JSON first when it looks like JSON (YAML rejects JSON's tab indentation), else YAML."""
    size = len(source.encode("utf-8", "surrogatepass"))
    if size > MAX_FILE_BYTES:
        raise DefinitionError(
            [("(file)", f"is {size} bytes; definitions are limited to {MAX_FILE_BYTES} bytes")]
        )
    if "\x00" in source:
        line = source.count("\n", 0, source.index("\x00")) + 1
        raise DefinitionError([("(file)", f"contains a NUL byte (line {line}); remove it")])
    if source.lstrip().startswith("{"):
        try:
            return json.loads(
                source, object_pairs_hook=_reject_duplicate_json_keys, parse_int=_parse_json_int
            )
        except json.JSONDecodeError as error:
            raise DefinitionError(
                [
                    (
                        "(file)",
                        f"not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}",
                    )
                ]
            ) from None
        except RecursionError:
            raise DefinitionError(
                [("(file)", f"nested more than {MAX_DEPTH} levels deep")]
            ) from None
        except ValueError as error:
            raise DefinitionError([("(file)", f"not valid: {error}")]) from None
    return yaml.load(source, Loader=_SafeLoader)  # a SafeLoader subclass: safe


def parse(source: str, *, source_name: str = "definition") -> Definition:
    """Parse YAML or JSON text and validate it into a normalised spec."""
    try:
        raw = _load(source)
    except DefinitionError as error:
        raise DefinitionError(error.problems, source_name) from None
    except _Refused as error:
        where = f"line {error.mark.line + 1}, column {error.mark.column + 1}"
        raise DefinitionError([("(file)", f"{error.message} ({where})")], source_name) from None
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


def checksum(spec: dict) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- 2. Limits on the loaded document -----------------------------------------------------------


def _limit_problems(root, root_path: str = "") -> list[tuple[str, str]]:
    """Depth, string length, NUL, unpaired surrogates and 64-bit integers, each with its path.

    Iterative, so a deep document cannot exhaust the stack; stops at the first problem
    of each path.
    """
    problems = []
    stack = [(root_path, root, 1)]
    while stack:
        path, value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                problems.append((path or "(file)", f"nested more than {MAX_DEPTH} levels deep"))
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value)
            children = []
            for key, item in items:
                child = f"{path}[{key}]" if isinstance(value, list) else _join(path, key)
                if isinstance(value, dict) and isinstance(key, str):
                    problem = _text_problem(key)
                    if problem:
                        problems.append((child, f"the key {problem}"))
                        continue
                children.append((child, item, depth + 1))
            stack.extend(reversed(children))
        elif isinstance(value, str):
            problem = _text_problem(value)
            if problem:
                problems.append((path, problem))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            problems.append((path, f"integer is beyond 64 bits (at most {MAX_INT})"))
    return problems


def _text_problem(text: str) -> str | None:
    if len(text) > MAX_STRING_CHARS:
        return f"is {len(text)} characters long; at most {MAX_STRING_CHARS} are allowed"
    if "\x00" in text:
        return "contains a NUL (\\u0000) character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it has an unpaired surrogate)"
    return None


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _json_problems(path: str, value) -> list[tuple[str, str]]:
    """Values strict JSON cannot hold (dates, NaN, infinity…), each with its path."""
    problems = []
    stack = [(path, value)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if key is not None and not isinstance(key, str | int | bool):
                    problems.append((f"{path}.{key}", "keys must be strings"))
                else:
                    stack.append((f"{path}.{key}", item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append((path, f"{value} is not a number JSON can hold"))
        elif value is not None and not isinstance(value, str | int | float | bool):
            problems.append(
                (
                    path,
                    f"must be a JSON value (string, number, boolean, list or mapping), got {type(value).__name__} {value!r}; quote it to make it a string",
                )
            )
    return sorted(problems)


def _params_size_problem(path: str, params: dict) -> list[tuple[str, str]]:
    size = len(json.dumps(params, separators=(",", ":")).encode())
    if size > MAX_PARAMS_BYTES:
        return [(path, f"is {size} bytes as JSON; at most {MAX_PARAMS_BYTES} are allowed")]
    return []


# --- 3. The schema --------------------------------------------------------------------------------


def _problem(message: str) -> PydanticCustomError:
    # The message travels in the context: it may hold braces, which a template would format.
    return PydanticCustomError("keel", "{message}", {"message": message})


def _is_int_between(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _string_keys(data):
    """YAML keys need not be strings (1, true, null); paths and messages use them as text."""
    return {str(key): value for key, value in data.items()} if isinstance(data, dict) else data


def _whole_seconds(value, *, optional: bool, low: int = 1, high: int | None = None):
    high = settings.KEEL_MAX_TIMEOUT if high is None else high
    if value is None and optional:
        return None
    if not _is_int_between(value, low, high):
        raise _problem(f"must be whole seconds between {low} and {high} (got {value!r})")
    return value


def _optional_seconds(value):
    return _whole_seconds(value, optional=True)


def _text(value):
    if not isinstance(value, str):
        raise _problem("must be a string")
    return value


def _mapping(message: str):
    def check(value):
        if not isinstance(value, dict):
            raise _problem(message)
        return value

    return check


def _delay(value):
    # Written so that NaN fails too: it compares false with every bound.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 86400:
        raise _problem("must be a number from 0 to 86400")
    return value


Text = Annotated[Any, BeforeValidator(_text)]
Delay = Annotated[Any, BeforeValidator(_delay)]
OptionalSeconds = Annotated[Any, BeforeValidator(_optional_seconds)]


class _Model(BaseModel):
    # Nothing is coerced: a definition's values are checked, never converted.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _keys_as_text(cls, data):
        return _string_keys(data)


class Retries(_Model):
    max_attempts: Any = 1
    backoff: Delay = 5
    factor: Delay = 2
    max_delay: Delay = 300
    jitter: Any = True
    retry_on: Any = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _number_means_max_attempts(cls, data):
        if isinstance(data, int) and not isinstance(data, bool):
            return {"max_attempts": data}
        if not isinstance(data, dict):
            raise _problem(
                "must be a mapping (max_attempts, backoff, factor, max_delay, jitter, retry_on)"
            )
        return _string_keys(data)

    @field_validator("max_attempts", mode="before")
    @classmethod
    def _attempts(cls, value):
        if not _is_int_between(value, 1, MAX_ATTEMPTS):
            raise _problem(f"must be a whole number from 1 to {MAX_ATTEMPTS}")
        return value

    @field_validator("jitter", mode="before")
    @classmethod
    def _jitter(cls, value):
        if not isinstance(value, bool):
            raise _problem("must be true or false")
        return value

    @field_validator("retry_on", mode="before")
    @classmethod
    def _retry_on(cls, value):
        if not isinstance(value, list) or not all(
            isinstance(item, str) and item.isidentifier() for item in value
        ):
            raise _problem(
                "must be a list of exception class names, e.g. [ConnectionError, TimeoutError]"
            )
        return value


class Node(_Model):
    type: Any = Field(default=None, validate_default=True)
    params: Annotated[Any, BeforeValidator(_mapping("must be a mapping"))] = Field(
        default_factory=dict
    )
    after: Any = Field(default_factory=list)
    # Declared before soft_timeout: its validator compares with the valid timeout.
    timeout: Any = Field(default=None, validate_default=True)
    soft_timeout: OptionalSeconds = None
    expected_duration: Any = None
    stall_after: OptionalSeconds = None
    retries: Retries = Field(default_factory=Retries)
    pool: Any = ""
    priority: Any = None
    description: Text = ""

    @model_validator(mode="before")
    @classmethod
    def _mapping_with_type(cls, data):
        if not isinstance(data, dict):
            raise _problem("must be a mapping with at least 'type'")
        data = _string_keys(data)
        # An explicit null is an error; only an absent timeout takes the default.
        data.setdefault("timeout", settings.KEEL_DEFAULT_TIMEOUT)
        return data

    @field_validator("type", mode="before")
    @classmethod
    def _registered_type(cls, value):
        if not isinstance(value, str) or not value:
            raise _problem("required: the name of a registered node type")
        if not registry.is_registered(value):
            raise _problem(f"no node type named {value!r} is registered")
        return value

    @field_validator("after", mode="before")
    @classmethod
    def _after(cls, value):
        after = _after_list(value)
        if after is None:
            raise _problem("must be a list of node keys")
        if len(set(after)) != len(after):
            raise _problem("names the same node twice")
        return after

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value):
        return _whole_seconds(value, optional=False)

    @field_validator("soft_timeout", mode="after")
    @classmethod
    def _soft_below_timeout(cls, value, info: ValidationInfo):
        timeout = info.data.get("timeout")
        if value is not None and timeout is not None and value >= timeout:
            raise _problem(f"must be below timeout ({timeout}) so the node can stop in time")
        return value

    @field_validator("expected_duration", mode="before")
    @classmethod
    def _expected(cls, value):
        if value is not None and not _is_int_between(value, 1, settings.KEEL_MAX_TIMEOUT):
            raise _problem(f"must be whole seconds between 1 and {settings.KEEL_MAX_TIMEOUT}")
        return value

    @field_validator("pool", mode="before")
    @classmethod
    def _declared_pool(cls, value, info: ValidationInfo):
        pools = (info.context or {}).get("pools", {})
        if value and (not isinstance(value, str) or value not in pools):
            raise _problem(
                f"pool {value!r} is not declared under 'pools' (add pools: {{{value}: <slots>}})"
            )
        return value or ""

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value):
        if value is not None and value not in PRIORITIES:
            raise _problem(f"must be one of {', '.join(PRIORITIES)} (got {value!r})")
        return value

    def normalised(self) -> dict:
        node = self.model_dump(exclude={"stall_after"})
        # Only when declared: the checksum of a definition that does not use it stays
        # the same, so loading it again makes no new version.
        if self.stall_after is not None:
            node["stall_after"] = self.stall_after
        return node


def _after_list(value) -> list[str] | None:
    """``after`` as a list of names (one name is a list of one), or None when malformed."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return None
    return value


def _node_key(key):
    if not NODE_KEY_PATTERN.match(key):
        raise _problem(
            "node keys start with a letter and use letters, digits, '_' or '-' (at most 100)"
        )
    return key


def _pool_name(name):
    if not POOL_NAME_PATTERN.match(name):
        raise _problem("pool names are lowercase letters, digits, '-' or '_'")
    return name


def _pool_slots(slots):
    if not _is_int_between(slots, 1, 10_000):
        raise _problem(f"slots must be a whole number from 1 to 10000 (got {slots!r})")
    return slots


def _nodes(value):
    if not isinstance(value, dict) or not value:
        raise _problem("required: a mapping of node keys to node definitions")
    return _string_keys(value)


def _pools(value):
    if not isinstance(value, dict):
        raise _problem("must be a mapping of pool names to slot counts")
    return _string_keys(value)


class Spec(_Model):
    name: Any = Field(default=None, validate_default=True)
    slug: Any = None
    description: Text = ""
    timeout: Any = None
    params: Annotated[
        Any,
        BeforeValidator(_mapping("must be a mapping of run parameter names to default values")),
    ] = Field(default_factory=dict)
    pools: Annotated[
        dict[
            Annotated[str, BeforeValidator(_pool_name)],
            Annotated[Any, BeforeValidator(_pool_slots)],
        ],
        BeforeValidator(_pools),
    ] = Field(default_factory=dict)
    nodes: Annotated[
        dict[Annotated[str, BeforeValidator(_node_key)], Node], BeforeValidator(_nodes)
    ] = Field(default=None, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _slug_from_name(cls, data):
        data = _string_keys(data)
        if isinstance(data, dict) and "slug" not in data:
            name = data.get("name")
            data["slug"] = slugify(name if isinstance(name, str) else "")
        return data

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value):
        if not isinstance(value, str) or not value.strip():
            raise _problem("required: a non-empty string")
        return value.strip()

    @field_validator("slug", mode="before")
    @classmethod
    def _slug(cls, value):
        if not isinstance(value, str) or not SLUG_PATTERN.fullmatch(value):
            raise _problem(
                "must be lowercase letters, digits, '-' or '_' (or omitted to derive it from name)"
            )
        return value

    @field_validator("timeout", mode="before")
    @classmethod
    def _run_timeout(cls, value):
        return _whole_seconds(value, optional=True, high=MAX_RUN_TIMEOUT)

    def normalised(self) -> dict:
        return {
            "name": self.name,
            "slug": self.slug,
            "description": self.description,
            "timeout": self.timeout,
            "params": self.params,
            "pools": self.pools,
            "nodes": {key: node.normalised() for key, node in self.nodes.items()},
            # PostgreSQL's jsonb does not keep key order; the order nodes were written in.
            "order": list(self.nodes),
        }


_ALLOWED = {
    Spec: sorted(Spec.model_fields),
    Node: sorted(Node.model_fields),
    Retries: sorted(Retries.model_fields),
}


def _schema_problems(error: ValidationError) -> list[tuple[str, str]]:
    """pydantic's errors as (dotted path, message); locations are where the value was."""
    problems = []
    for item in error.errors():
        loc = [part for part in item["loc"] if part != "[key]"]
        path = ".".join(str(part) for part in loc)
        if item["type"] == "keel":
            message = item["ctx"]["message"]
        elif item["type"] == "extra_forbidden":
            model = Spec if len(loc) == 1 else Retries if len(loc) == 4 else Node
            message = f"unknown field (allowed: {', '.join(_ALLOWED[model])})"
        else:  # not expected: every field has its own check
            message = item["msg"]
        problems.append((path or "(file)", message))
    return problems


def validate(raw, *, source_name: str = "definition") -> dict:
    """Check a loaded definition (steps 2 and 3) and return its normalised spec."""
    if not isinstance(raw, dict):
        raise DefinitionError(
            [("(file)", "must be a mapping with at least 'name' and 'nodes'")], source_name
        )
    nodes_raw = raw.get("nodes")
    if isinstance(nodes_raw, dict) and len(nodes_raw) > MAX_NODES:
        raise DefinitionError(
            [("nodes", f"has {len(nodes_raw)} nodes; at most {MAX_NODES} are allowed")],
            source_name,
        )
    # A document past these limits is refused as it stands: its other problems can wait.
    problems = _limit_problems(raw)
    if problems:
        raise DefinitionError(problems, source_name)

    pools_raw = raw.get("pools", {})
    model = None
    try:
        model = Spec.model_validate(
            raw, context={"pools": pools_raw if isinstance(pools_raw, dict) else {}}
        )
    except ValidationError as error:
        problems.extend(_schema_problems(error))

    if isinstance(nodes_raw, dict):
        problems.extend(_node_param_problems(nodes_raw))
        problems.extend(_graph_problems(nodes_raw))
    problems.extend(_params_problems("params", raw.get("params", {})))
    if isinstance(nodes_raw, dict):
        for key, node in nodes_raw.items():
            if isinstance(node, dict):
                problems.extend(_params_problems(f"nodes.{key}.params", node.get("params", {})))
    if problems or model is None:
        raise DefinitionError(problems, source_name)

    spec = model.normalised()
    size = len(json.dumps(spec, separators=(",", ":")).encode())
    if size > MAX_SPEC_BYTES:
        raise DefinitionError(
            [("(file)", f"the spec is {size} bytes as JSON; at most {MAX_SPEC_BYTES} allowed")],
            source_name,
        )
    return spec


def _params_problems(path: str, params) -> list[tuple[str, str]]:
    if not isinstance(params, dict):
        return []  # the schema says so
    return _json_problems(path, params) or _params_size_problem(path, params)


def _node_param_problems(nodes_raw: dict) -> list[tuple[str, str]]:
    """Params checked against each registered node type's declared schema."""
    problems = []
    for key, node in nodes_raw.items():
        if not isinstance(node, dict):
            continue
        type_name, params = node.get("type"), node.get("params", {})
        registered = isinstance(type_name, str) and registry.is_registered(type_name)
        if registered and isinstance(params, dict):
            for param, message in registry.get(type_name).check_params(params).items():
                problems.append((f"nodes.{key}.params.{param}", message))
    return problems


def _graph_problems(nodes_raw: dict) -> list[tuple[str, str]]:
    """Missing upstreams and self-dependencies, else one cycle, from each node's ``after``."""
    nodes = {}
    for key, node in nodes_raw.items():
        after = _after_list(node.get("after", [])) if isinstance(node, dict) else None
        nodes[str(key)] = {"after": after or []}
    problems = []
    for key, node in nodes.items():
        for upstream in node["after"]:
            if upstream == key:
                problems.append((f"nodes.{key}.after", "a node cannot run after itself"))
                break
            if upstream not in nodes:
                problems.append(
                    (
                        f"nodes.{key}.after",
                        f"names {upstream!r}, which is not a node of this workflow",
                    )
                )
                break
    if problems:
        return problems
    cycle = find_cycle(nodes)
    if cycle:
        problems.append((f"nodes.{cycle[0]}.after", f"cycle: {' -> '.join(cycle)}"))
    return problems


# --- The graph ----------------------------------------------------------------------------------


def find_cycle(nodes: dict[str, dict]) -> list[str]:
    """Return one cycle as [a, b, ..., a], or [] when the graph is a DAG.

    Written as "a -> b" meaning "b runs after a", starting from the cycle's node that
    the definition names first.
    """
    try:
        graphlib.TopologicalSorter({key: node["after"] for key, node in nodes.items()}).prepare()
    except graphlib.CycleError as error:
        cycle = list(error.args[1][:-1])
    else:
        return []
    # graphlib lists each node before the one it runs after; reverse to "runs before".
    if len(cycle) > 1 and cycle[0] not in nodes[cycle[1]]["after"]:
        cycle.reverse()
    position = {key: index for index, key in enumerate(nodes)}
    start = min(range(len(cycle)), key=lambda index: position.get(cycle[index], 0))
    cycle = cycle[start:] + cycle[:start]
    return [*cycle, cycle[0]]


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
    """Every node after its upstreams; among nodes ready together, definition order.

    Raises ``graphlib.CycleError`` (a ValueError) for a cyclic graph, which a validated
    spec never has.
    """
    keys = node_keys(spec)
    position = {key: index for index, key in enumerate(keys)}
    sorter = graphlib.TopologicalSorter({key: spec["nodes"][key]["after"] for key in keys})
    sorter.prepare()
    order = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda key: position.get(key, len(position)))
        order.extend(ready)
        sorter.done(*ready)
    return order


# --- Run params ---------------------------------------------------------------------------------

_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a JSON object",
}


def run_param_problems(declared: dict, given: dict) -> list[tuple[str, str]]:
    """Given run params checked against the definition's declared defaults.

    Each value must have its default's type (int/float/str/bool/list/dict); a bool is
    not an int, an int is accepted for a float, a null default accepts anything. The same
    limits as a definition's params apply. Unknown names are the caller's to refuse.
    """
    problems = _limit_problems(given, "params") or _json_problems("params", given)
    if problems:
        return problems
    for name, value in given.items():
        default = declared.get(name)
        expected = next((kind for kind in _TYPE_NAMES if isinstance(default, kind)), None)
        if expected is None or _has_type(value, expected):
            continue
        problems.append(
            (
                f"params.{name}",
                f"expected {_TYPE_NAMES[expected]} (the default is "
                f"{json.dumps(default)[:80]}), got {json.dumps(value)[:80]}",
            )
        )
    return problems or _params_size_problem("params", given)


def _has_type(value, expected: type) -> bool:
    if isinstance(value, bool) and expected is not bool:
        return False
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)
