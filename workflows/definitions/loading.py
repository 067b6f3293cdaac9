"""Step 1 of checking a definition: YAML or JSON text in, plain Python data out.

A size limit on the text, no NUL bytes, no YAML anchors or aliases, repeated keys
refused, a nesting limit enforced while composing: a hostile file never expands or
recurses.
"""

import hashlib
import json

import yaml

from workflows.definitions.limits import _MAX_INT_DIGITS, MAX_DEPTH, MAX_FILE_BYTES, MAX_INT


class DefinitionError(ValueError):
    """A definition that cannot become a version. ``problems`` lists (field path, message)."""

    def __init__(self, problems: list[tuple[str, str]], source_name: str = "definition"):
        self.problems = problems
        self.source_name = source_name
        lines = "\n".join(f"  - {path}: {message}" for path, message in problems)
        super().__init__(f"{source_name} is not a valid workflow definition:\n{lines}")


class Refused(yaml.YAMLError):
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
            raise Refused("YAML anchors and aliases are not allowed", event.start_mark)
        collection = isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent)
        if collection:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise Refused(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            if collection:
                self._depth -= 1

    def construct_yaml_int(self, node):
        digits = str(node.value).lstrip("+-").replace("_", "")
        if len(digits) > _MAX_INT_DIGITS:
            raise Refused(
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


def load_text(source: str):
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


def checksum(spec: dict) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
