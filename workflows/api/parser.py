"""Request bodies are JSON objects. NaN/Infinity and text the database cannot store (NUL,
unpaired surrogates) are refused here, naming the field they are in."""

import json

from ninja.parser import Parser
from pydantic_core import PydanticCustomError

from workflows.api.errors import invalid, json_type
from workflows.api.schemas import check_text


class JsonObjectParser(Parser):
    def parse_body(self, request) -> dict:
        raw = request.body
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as error:
            raise invalid("body", f"is not valid JSON ({error}).") from None
        except RecursionError:
            raise invalid("body", "is nested too deeply.") from None
        if not isinstance(data, dict):
            raise invalid("body", f"must be a JSON object, not {json_type(data)}.")
        for name, value in data.items():
            try:
                check_text(name)
                check_text(value)
            except PydanticCustomError as error:
                raise invalid(str(name), error.message()) from None
        return data


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


parser = JsonObjectParser()
