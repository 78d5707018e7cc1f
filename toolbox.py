"""The toolbox: tools that run on the server, in a switch table from name to schema and function.

Adding a tool is one entry in TOOLBOX. The model's arguments are matched to parameters by
name and converted to the types the schema declares before the function sees them.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx


class ToolError(Exception):
    """A tool could not run. The message is shown to the model or the client as it is."""


@dataclass(frozen=True)
class ToolEnv:
    """What tools may use: the shared HTTP client and their upstream addresses."""

    http: httpx.AsyncClient
    open_meteo_url: str


@dataclass(frozen=True)
class Tool:
    schema: dict[str, Any]  # the declaration offered to Ollama
    function: Callable[..., Awaitable[str]]  # called as function(env, **arguments)


async def get_weather(env: ToolEnv, latitude: float, longitude: float) -> str:
    """The current temperature at a place, in °F, from Open-Meteo."""
    check_coordinates(latitude, longitude)
    params = {
        "latitude": latitude,
        "longitude": longitude,
        "current": "temperature_2m",
        "temperature_unit": "fahrenheit",
    }
    try:
        response = await env.http.get(env.open_meteo_url, params=params)
    except httpx.HTTPError as exc:
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "is unreachable"
        raise ToolError(f"Open-Meteo {kind}: {type(exc).__name__}") from exc
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200:
        reason = body.get("reason") if isinstance(body, dict) else None
        raise ToolError(f"Open-Meteo answered HTTP {response.status_code}: {reason or 'no reason'}")
    try:
        temperature = body["current"]["temperature_2m"]
    except (TypeError, KeyError) as exc:
        raise ToolError("Open-Meteo's answer has no current temperature") from exc
    return f"Weather at lat: {latitude}, lon: {longitude} is {temperature}ºF"


LATITUDES = (-90.0, 90.0)
LONGITUDES = (-180.0, 180.0)


def check_coordinates(latitude: float, longitude: float) -> None:
    if not LATITUDES[0] <= latitude <= LATITUDES[1]:
        raise ToolError(f"latitude must be between -90 and 90, not {latitude}")
    if not LONGITUDES[0] <= longitude <= LONGITUDES[1]:
        raise ToolError(f"longitude must be between -180 and 180, not {longitude}")


TOOLBOX: dict[str, Tool] = {
    "get_weather": Tool(
        schema={
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the current temperature at a latitude and longitude",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "latitude": {"type": "number", "description": "Latitude, -90 to 90"},
                        "longitude": {"type": "number", "description": "Longitude, -180 to 180"},
                    },
                    "required": ["latitude", "longitude"],
                },
            },
        },
        function=get_weather,
    ),
}


async def run(env: ToolEnv, name: str, arguments: Any) -> str:
    """Run a resident tool with the model's arguments; raise ToolError if it cannot."""
    tool = TOOLBOX[name]
    converted = convert_arguments(tool.schema["function"].get("parameters") or {}, arguments)
    return await tool.function(env, **converted)


def convert_arguments(parameters: dict[str, Any], arguments: Any) -> dict[str, Any]:
    """Match arguments to a JSON schema's properties by name, converting where it is clean.

    A number is accepted for a string parameter and a numeric string for a number; any
    other mismatch, a missing required argument or an unknown one is a ToolError.
    """
    if not isinstance(arguments, dict):
        raise ToolError("arguments must be a JSON object")
    properties: dict[str, Any] = parameters.get("properties") or {}
    missing = [name for name in parameters.get("required") or () if name not in arguments]
    if missing:
        raise ToolError(f"missing required argument(s): {', '.join(missing)}")
    unknown = [name for name in arguments if name not in properties]
    if unknown:
        raise ToolError(f"unknown argument(s): {', '.join(unknown)}")
    return {
        name: _convert(name, properties[name].get("type"), value)
        for name, value in arguments.items()
    }


def _convert(name: str, kind: str | None, value: Any) -> Any:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "string":
        if isinstance(value, str):
            return value
        if is_number:
            return str(value)
    elif kind in ("number", "integer"):
        number = value if is_number else _parse_number(value)
        if number is not None and math.isfinite(number):
            if kind == "number":
                return float(number)
            if float(number).is_integer():
                return int(number)
    elif kind == "boolean":
        if isinstance(value, bool):
            return value
    else:  # the schema does not constrain it
        return value
    expected = {"string": "a string", "number": "a number", "integer": "an integer"}
    raise ToolError(f"argument {name} must be {expected.get(kind, 'true or false')}, not {value!r}")


def _parse_number(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return float(value.strip())
    except ValueError:
        return None
