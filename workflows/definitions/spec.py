"""Parse and validate workflow definitions (YAML or JSON) into a normalised spec.

A definition is checked completely before anything is written; every problem is
reported with the path of the field it concerns (``nodes.load.after``), so a user
can fix them all in one go. Nothing in a definition is evaluated.

Checking happens in three steps:

1. Loading (``loading.py``): text to data, hostile YAML refused while composing.
2. Limits on the loaded document (``limits.py``): node count, string length, 64-bit ints.
3. The schema: the pydantic models below, then node-type params and the graph
   (``graph.py``), which need the whole definition.
"""

import json
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
from workflows.definitions.graph import find_cycle
from workflows.definitions.limits import (
    MAX_NODES,
    MAX_SPEC_BYTES,
    json_problems,
    limit_problems,
    params_size_problem,
)
from workflows.definitions.loading import DefinitionError, Refused, checksum, load_text
from workflows.definitions.params import run_param_problems

PRIORITIES = ("high", "default", "low")
NODE_KEY_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,99}$")
POOL_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,99}$")
SLUG_PATTERN = re.compile(r"[a-z0-9][a-z0-9_\-]{0,99}")
MAX_ATTEMPTS = 20
MAX_RUN_TIMEOUT = 7 * 24 * 3600


@dataclass(frozen=True)
class Definition:
    spec: dict
    source: str
    checksum: str

    @property
    def slug(self) -> str:
        return self.spec["slug"]


def parse(source: str, *, source_name: str = "definition") -> Definition:
    """Parse YAML or JSON text and validate it into a normalised spec."""
    try:
        raw = load_text(source)
    except DefinitionError as error:
        raise DefinitionError(error.problems, source_name) from None
    except Refused as error:
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
    # Declared after pool: its validator needs the pool.
    pool_timeout: OptionalSeconds = None
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

    @field_validator("pool_timeout", mode="after")
    @classmethod
    def _pool_timeout_needs_a_pool(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("pool"):
            raise _problem("needs a pool: it is how long the node waits for one of its slots")
        return value

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value):
        if value is not None and value not in PRIORITIES:
            raise _problem(f"must be one of {', '.join(PRIORITIES)} (got {value!r})")
        return value

    def normalised(self) -> dict:
        node = self.model_dump(exclude={"stall_after", "pool_timeout"})
        # Only when declared: the checksum of a definition that does not use them stays
        # the same, so loading it again makes no new version.
        for name in ("stall_after", "pool_timeout"):
            if getattr(self, name) is not None:
                node[name] = getattr(self, name)
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


DEPLOY_STRATEGIES = ("immediate", "canary", "blue_green")


class Deploy(_Model):
    """How a new version of this workflow is deployed by default (workflows/deployments)."""

    strategy: Any = "immediate"
    steps: Any = Field(default_factory=lambda: [10, 50, 100])
    min_runs: Any = 20
    key_param: Text = ""
    smoke_params: Annotated[
        Any,
        BeforeValidator(_mapping("must be a mapping of run parameter names to values")),
    ] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, data):
        if not isinstance(data, dict):
            raise _problem("must be a mapping (strategy, steps, min_runs, key_param, smoke_params)")
        return _string_keys(data)

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy(cls, value):
        if value not in DEPLOY_STRATEGIES:
            raise _problem(f"must be one of {', '.join(DEPLOY_STRATEGIES)}")
        return value

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, value):
        if (
            not isinstance(value, list)
            or not value
            or not all(_is_int_between(step, 1, 100) for step in value)
            or value != sorted(set(value))
            or value[-1] != 100
        ):
            raise _problem(
                "must be rising percentages of new runs ending at 100, e.g. [10, 50, 100]"
            )
        return value

    @field_validator("min_runs", mode="before")
    @classmethod
    def _min_runs(cls, value):
        if not _is_int_between(value, 1, 100_000):
            raise _problem("must be a whole number from 1 to 100000")
        return value


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
    deploy: Deploy | None = None

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
            **({"deploy": self.deploy.model_dump()} if self.deploy else {}),
            # PostgreSQL's jsonb does not keep key order; the order nodes were written in.
            "order": list(self.nodes),
        }


_ALLOWED = {
    Spec: sorted(Spec.model_fields),
    Deploy: sorted(Deploy.model_fields),
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
            model = (
                Spec
                if len(loc) == 1
                else Deploy
                if loc[0] == "deploy"
                else Retries
                if len(loc) == 4
                else Node
            )
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
    problems = limit_problems(raw)
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
    if model is not None and model.deploy is not None:
        problems.extend(deploy_param_problems(model.params, model.deploy))
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


def deploy_param_problems(declared: dict, deploy: Deploy) -> list[tuple[str, str]]:
    """The ``deploy`` section's run params against the declared ones: ``key_param`` names
    one, and ``smoke_params`` would start a run (the validation run of a blue-green)."""
    problems = []
    if deploy.key_param and deploy.key_param not in declared:
        problems.append(("deploy.key_param", unknown_param_message(deploy.key_param, declared)))
    for name in deploy.smoke_params:
        if name not in declared:
            problems.append((f"deploy.smoke_params.{name}", unknown_param_message(name, declared)))
    known = {name: value for name, value in deploy.smoke_params.items() if name in declared}
    problems.extend(
        (f"deploy.smoke_{path}", message) for path, message in run_param_problems(declared, known)
    )
    return problems


def unknown_param_message(name: str, declared: dict) -> str:
    known = ", ".join(sorted(declared)) or "none"
    return f"names {name!r}, which is not a declared run param (params: {known})"


def _params_problems(path: str, params) -> list[tuple[str, str]]:
    if not isinstance(params, dict):
        return []  # the schema says so
    return json_problems(path, params) or params_size_problem(path, params)


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
