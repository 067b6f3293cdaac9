"""Limits that keep a hostile or mistaken definition (or run params) cheap to refuse.

Each check returns (field path, message) problems; iterative, so a deep document cannot
exhaust the stack.
"""

import json
import math

# Limits that keep a hostile or mistaken definition cheap to refuse.
MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_SPEC_BYTES = 8 * 1024 * 1024  # the normalised spec as JSON (defaults written out)
MAX_DEPTH = 20  # nested mappings and lists, the document itself being level 1
MAX_NODES = 5000
MAX_STRING_CHARS = 10_000
MAX_PARAMS_BYTES = 64 * 1024  # run params, and each node's params, as JSON
MAX_INT = 2**63 - 1  # what PostgreSQL's bigint and most JSON readers hold
_MAX_INT_DIGITS = 25  # longer digit strings are refused before int() converts them


def limit_problems(root, root_path: str = "") -> list[tuple[str, str]]:
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
                child = f"{path}[{key}]" if isinstance(value, list) else join_path(path, key)
                if isinstance(value, dict) and isinstance(key, str):
                    problem = text_problem(key)
                    if problem:
                        problems.append((child, f"the key {problem}"))
                        continue
                children.append((child, item, depth + 1))
            stack.extend(reversed(children))
        elif isinstance(value, str):
            problem = text_problem(value)
            if problem:
                problems.append((path, problem))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            problems.append((path, f"integer is beyond 64 bits (at most {MAX_INT})"))
    return problems


def text_problem(text: str) -> str | None:
    if len(text) > MAX_STRING_CHARS:
        return f"is {len(text)} characters long; at most {MAX_STRING_CHARS} are allowed"
    if "\x00" in text:
        return "contains a NUL (\\u0000) character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it has an unpaired surrogate)"
    return None


def join_path(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def json_problems(path: str, value) -> list[tuple[str, str]]:
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


def params_size_problem(path: str, params: dict) -> list[tuple[str, str]]:
    size = len(json.dumps(params, separators=(",", ":")).encode())
    if size > MAX_PARAMS_BYTES:
        return [(path, f"is {size} bytes as JSON; at most {MAX_PARAMS_BYTES} are allowed")]
    return []
