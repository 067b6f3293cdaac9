"""Run params checked against the types of the definition's declared defaults."""

import json

from workflows.definitions.limits import json_problems, limit_problems, params_size_problem

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
    problems = limit_problems(given, "params") or json_problems("params", given)
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
    return problems or params_size_problem("params", given)


def _has_type(value, expected: type) -> bool:
    if isinstance(value, bool) and expected is not bool:
        return False
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)
