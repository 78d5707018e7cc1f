"""What the routes accept: each field's rule, as the handlers check it and as /openapi.json
documents it (openapi.py builds its schemas from the rules here, so the two cannot drift).

Every refusal is a ClientError, which the app renders as a JSON `{"error": "..."}` with its
status: 400 for a body that is not JSON, 422 for a field that breaks its rule (the message
names the field and the rule).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import toolbox
from ollama import ROLES, Message

# Text that names something (an appID, a model, a tool): no control characters (they
# can't be told apart in logs, and PostgreSQL can't store NUL), and not only spaces.
# Written so that Python and JSON Schema read it alike. (A lone UTF-16 surrogate, which a
# JSON string can escape but which is no Unicode character, is refused as well.)
NAME_PATTERN = r"[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*"
# An appID is such a name without slashes too: it is a path segment of /conversations/...
APP_ID_PATTERN = r"[^\x00-\x1f\x7f-\x9f/]*[^\x00-\x20\x7f-\x9f/][^\x00-\x1f\x7f-\x9f/]*"
EVENT_ID_PATTERN = r"[0-9]{1,18}"
MAX_APP_ID = 155  # the tutorial's VARCHAR(155)
THINK_VALUES: tuple[bool | str, ...] = (True, False, "low", "medium", "high")
OLLAMA_FIELDS = ("options", "format", "keep_alive", "think")  # passed to Ollama as they are


class ClientError(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def invalid(error: str) -> ClientError:
    return ClientError(422, error)


@dataclass(frozen=True)
class Text:
    """A string that must match `pattern` whole, and be at most `max_length` long."""

    pattern: str
    what: str  # says what is wanted, for the error
    max_length: int | None = None

    def check(self, name: str, value: Any) -> str:
        if (
            not isinstance(value, str)
            or (self.max_length is not None and len(value) > self.max_length)
            or not re.fullmatch(self.pattern, value)
            or not (value.isascii() or _unicode(value))
        ):
            raise invalid(f"{name}: must be {self.what}")
        return value

    def schema(self) -> dict[str, Any]:
        found: dict[str, Any] = {"type": "string", "minLength": 1, "pattern": f"^{self.pattern}$"}
        if self.max_length is not None:
            found["maxLength"] = self.max_length
        return found


def _unicode(text: str) -> bool:
    """Whether the text is Unicode characters only (no lone surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Whole:
    """A whole number in a query string, from `lowest` to `highest`."""

    lowest: int
    highest: int

    def check(self, name: str, raw: str) -> int:
        if not (re.fullmatch(r"[0-9]{1,19}", raw) and self.lowest <= int(raw) <= self.highest):
            raise invalid(
                f"{name}: must be a whole number from {self.lowest} to {self.highest},"
                f" not {raw[:40]!r}"
            )
        return int(raw)

    def schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": self.lowest, "maximum": self.highest}


@dataclass(frozen=True)
class Number:
    """A finite number from `lowest` to `highest`, in JSON or as a numeric string."""

    lowest: float
    highest: float

    def check(self, name: str, value: Any) -> float:
        if value is None:
            raise invalid(f"{name}: required, a number from {self.lowest:g} to {self.highest:g}")
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise invalid(f"{name}: must be a number, not {value!r}") from None
        if not (math.isfinite(number) and self.lowest <= number <= self.highest):
            raise invalid(f"{name}: must be a number from {self.lowest:g} to {self.highest:g}")
        return number

    def schema(self) -> dict[str, Any]:
        return {"type": "number", "minimum": self.lowest, "maximum": self.highest}


APP_ID = Text(
    APP_ID_PATTERN,
    f"a string of 1 to {MAX_APP_ID} characters, not all spaces, without control characters"
    " or slashes",
    MAX_APP_ID,
)
MODEL = Text(NAME_PATTERN, "a model's name: not empty, without control characters")
TOOL_NAME = Text(NAME_PATTERN, "a tool's name: not empty, without control characters")
EVENT_ID = Text(EVENT_ID_PATTERN, "an event id: 1 to 18 digits")
PAGE_LIMIT = Whole(1, 1000)
PAGE_AFTER = Whole(0, 2**62)
LATITUDE = Number(*toolbox.LATITUDES)
LONGITUDE = Number(*toolbox.LONGITUDES)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise ClientError(400, "the body is not valid UTF-8") from None
    except ValueError as exc:
        raise ClientError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ClientError(400, "the body is not valid JSON: it is nested too deeply") from None


def parse_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid("body: must be a JSON object")
    return body


@dataclass
class Chat:
    """A /llmchat or /llmtools body, checked."""

    app_id: str
    model: str
    messages: list[Message]
    ollama_fields: dict[str, Any]
    declared_tools: list[dict[str, Any]] | None


def parse_chat(body: Any, max_messages: int, *, with_tools: bool) -> Chat:
    body = parse_object(body)
    app_id = APP_ID.check("appID", body.get("appID"))
    model = MODEL.check("model", body.get("model"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: must be a non-empty list of messages")
    if len(messages) > max_messages:
        raise invalid(f"messages: at most {max_messages} in one request")
    return Chat(
        app_id=app_id,
        model=model,
        messages=[parse_message(i, message) for i, message in enumerate(messages)],
        ollama_fields=parse_ollama_fields(body),
        declared_tools=parse_tools(body.get("tools")) if with_tools else None,
    )


def parse_message(index: int, message: Any) -> Message:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(f"{where}: must be an object with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise invalid(f"{where}.role: must be one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise invalid(f"{where}.content: must be a string")
    tool_name = message.get("tool_name")
    if tool_name is not None and not isinstance(tool_name, str):
        raise invalid(f"{where}.tool_name: must be a string or null")
    return Message(role, content, tool_name=tool_name if role == "tool" else None)


def parse_ollama_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The fields that go to Ollama as they are; null is the same as absent."""
    fields = {name: body[name] for name in OLLAMA_FIELDS if body.get(name) is not None}
    if "options" in fields and not isinstance(fields["options"], dict):
        raise invalid("options: must be an object")
    if "format" in fields and not isinstance(fields["format"], str | dict):
        raise invalid('format: must be "json" or a JSON schema object')
    think = fields.get("think")
    if think is not None and not (isinstance(think, bool) or think in THINK_VALUES[2:]):
        raise invalid('think: must be true, false, "low", "medium" or "high"')
    keep_alive = fields.get("keep_alive")
    if keep_alive is not None and (
        isinstance(keep_alive, bool) or not isinstance(keep_alive, str | int | float)
    ):
        raise invalid('keep_alive: must be a duration such as "5m" or a number of seconds')
    return fields


def parse_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Device tools as the apps declare them; `"parameters": null` is allowed."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise invalid("tools: must be a list of tool declarations")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise invalid(f"tools[{i}]: must be an object with a function object")
        function = tool["function"]
        name = TOOL_NAME.check(f"tools[{i}].function.name", function.get("name"))
        if name in toolbox.TOOLBOX:
            raise invalid(f"tools[{i}]: {name!r} is a resident tool's name; choose another")
        if tool.get("type", "function") != "function":
            raise invalid(f'tools[{i}].type: must be "function"')
        if not isinstance(function.get("description", ""), str):
            raise invalid(f"tools[{i}].function.description: must be a string")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid(f"tools[{i}].function.parameters: must be an object or null")
    return tools


def parse_last_event_id(header: str | None, query: str | None) -> int | None:
    """`Last-Event-ID` (or the `lastEventId` query parameter); None when neither is given."""
    if header is not None:
        return int(EVENT_ID.check("Last-Event-ID", header))
    if query is not None:
        return int(EVENT_ID.check("lastEventId", query))
    return None
