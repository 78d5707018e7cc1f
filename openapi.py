"""The OpenAPI 3.2 description of chatterd's routes, served at GET /openapi.json.

Postman imports it, client generators read it, and the test suite runs schemathesis
against it. The schemas of what the routes accept are built from the rules in checks.py,
the ones the handlers apply, and the document is made for the configuration the server
runs with (its message limit, whether it needs API keys).
"""

from __future__ import annotations

from typing import Any

import checks
import toolbox
from checks import APP_ID, EVENT_ID, LATITUDE, LONGITUDE, MODEL, PAGE_AFTER, PAGE_LIMIT, TOOL_NAME
from ollama import ROLES

OPEN_PATHS = ("/health", "/playground")  # answered without an API key


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def error(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": json_content(ref("Error"))}
    if retry_after:
        response["headers"] = {
            "Retry-After": {
                "description": "Seconds after which a place is likely free.",
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }
        }
    return response


def json_answer(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": json_content(ref(schema))}


# The Server-Sent Events of /llmchat and /llmtools. Each is an object with `event` (no name
# is `message`), `data` (one line of JSON) and `id`; chatterd's own notices are shaped as
# Ollama lines with empty content, so that apps that don't know them see nothing.

EVENTS = {
    "message": ("ChatLine", "One line of Ollama's /api/chat stream, unchanged."),
    "tool_calls": ("ToolCallsLine", "The Ollama line that calls a device tool: the app runs it."),
    "queued": ("QueuedLine", "The request waits its turn: its place in line (1 = next)."),
    "context": ("ContextLine", "Part of the history was left out of the prompt, and how much."),
    "tool_call": ("ToolCallLine", "The server starts one of its own tools for the model."),
    "tool_result": ("ToolResultLine", "What that tool answered (or the error it met)."),
    "notice": ("NoticeLine", "Tools withdrawn, an empty reply explained, calls ignored."),
    "error": ("Error", "A failure after the stream began; the turn was not stored."),
}


def _event_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "id": {"type": "string", "pattern": f"^{EVENT_ID.pattern}$"},
            "event": {"enum": list(EVENTS)},
            "data": {"type": "string"},
            "retry": {"type": "integer"},
        },
        "oneOf": [
            {
                "properties": {
                    "event": {"const": name},
                    "data": {"contentMediaType": "application/json", "contentSchema": ref(schema)},
                },
                "description": description,
            }
            for name, (schema, description) in EVENTS.items()
        ],
    }


SSE_DESCRIPTION = (
    "A stream of Server-Sent Events, each with an `id:` that increases within the appID"
    " (resume a lost stream with GET and `Last-Event-ID`), one line of JSON as `data:`. "
    + " ".join(f"`{name}`: {description}" for name, (_, description) in EVENTS.items())
    + " A stopped turn ends with an Ollama line whose `done_reason` is `stopped`."
    " A `: ping` comment comes every 15 seconds of silence."
)


def sse_stream(secured: bool) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": SSE_DESCRIPTION,
        "content": {"text/event-stream": {"itemSchema": ref("ChatEvent")}},
    }
    if secured:
        response["headers"] = {
            "Chatterd-Resume-Token": {
                "description": "Lets a browser's EventSource resume this appID without a key"
                " (the `token` query parameter of GET /llmchat and /llmtools).",
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]+\\.[A-Za-z0-9_-]+$"},
            }
        }
    return response


def _line(extra: dict[str, Any], required: str | None = None) -> dict[str, Any]:
    """A notice line: an Ollama chat line with empty content and chatterd's own field."""
    schema: dict[str, Any] = {
        "allOf": [ref("ChatLine")],
        "properties": {"message": ref("EmptyMessage"), **extra},
    }
    if required:
        schema["required"] = [required]
    return schema


def _tool_call() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["function"],
        "properties": {
            "id": {"type": "string"},
            "function": {
                "type": "object",
                "required": ["name", "arguments"],
                "properties": {
                    "index": {"type": "integer"},
                    "name": {"type": "string"},
                    "arguments": {"type": "object"},
                },
            },
        },
    }


STREAM_SCHEMAS: dict[str, Any] = {
    "ChatEvent": _event_schema(),
    "ChatLine": {
        "type": "object",
        "description": "One line of Ollama's /api/chat stream. The last has `done: true`,"
        " its `done_reason` and Ollama's metrics.",
        "required": ["model", "created_at", "message", "done"],
        "properties": {
            "model": {"type": "string"},
            "created_at": {"type": "string"},
            "message": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"const": "assistant"},
                    "content": {"type": "string"},
                    "thinking": {"type": "string"},
                    "tool_calls": {"type": "array", "items": ref("ToolCall")},
                },
            },
            "done": {"type": "boolean"},
            "done_reason": {"type": "string", "examples": ["stop", "length", "stopped"]},
            "eval_count": {"type": "integer"},
            "eval_duration": {"type": "integer"},
            "prompt_eval_count": {"type": "integer"},
        },
    },
    "EmptyMessage": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {"role": {"const": "assistant"}, "content": {"const": ""}},
    },
    "ToolCall": _tool_call(),
    "ToolCallsLine": {
        "allOf": [ref("ChatLine")],
        "properties": {
            "message": {"required": ["tool_calls"], "properties": {"tool_calls": {"minItems": 1}}}
        },
    },
    "QueuedLine": _line(
        {
            "queued": {
                "type": "object",
                "required": ["position"],
                "properties": {"position": {"type": "integer", "minimum": 1}},
            },
            "done": {"const": False},
        },
        "queued",
    ),
    "ContextLine": _line(
        {
            "trimmed": {
                "type": "object",
                "required": ["by"],
                "properties": {
                    "by": {"enum": ["chatterd", "ollama"]},
                    "omitted_messages": {"type": "integer"},
                    "sent_messages": {"type": "integer"},
                    "estimated_tokens": {"type": "integer"},
                    "max_messages": {"type": "integer"},
                    "max_tokens": {"type": "integer"},
                    "prompt_eval_count": {"type": "integer"},
                    "num_ctx": {"type": "integer"},
                },
            }
        },
        "trimmed",
    ),
    "ToolCallLine": _line(
        {
            "tool_call": {
                "type": "object",
                "required": ["name", "arguments"],
                "properties": {"name": {"type": "string"}, "arguments": {}},
            }
        },
        "tool_call",
    ),
    "ToolResultLine": _line(
        {
            "tool_result": {
                "type": "object",
                "required": ["name", "content", "error", "reused"],
                "properties": {
                    "name": {"type": "string"},
                    "content": {"type": "string"},
                    "error": {"type": "boolean"},
                    "reused": {
                        "type": "boolean",
                        "description": "A repeated call, answered with the first answer.",
                    },
                },
            }
        },
        "tool_result",
    ),
    "NoticeLine": _line(
        {
            "notice": {
                "type": "object",
                "required": ["kind", "text"],
                "properties": {
                    "kind": {"enum": ["tools_withdrawn", "empty_reply", "calls_ignored"]},
                    "reason": {"enum": ["repeated_call", "round_limit"]},
                    "text": {"type": "string"},
                    "tried": {"type": "array"},
                    "calls": {"type": "array"},
                },
            }
        },
        "notice",
    ),
    "GenerateLine": {
        "type": "object",
        "description": "One line of Ollama's /api/generate stream, unchanged.",
        "required": ["model", "created_at", "response", "done"],
        "properties": {
            "model": {"type": "string"},
            "created_at": {"type": "string"},
            "response": {"type": "string"},
            "thinking": {"type": "string"},
            "done": {"type": "boolean"},
            "context": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "GenerateStreamLine": {"anyOf": [ref("GenerateLine"), ref("Error")]},
}


# What the routes accept.


def request_schemas(max_messages: int) -> dict[str, Any]:
    optional = {"description": "null is the same as absent."}
    return {
        "Message": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "role": {"enum": list(ROLES)},
                "content": {
                    "type": "string",
                    "description": "NUL characters are stored (and sent back to the model)"
                    " as U+FFFD.",
                },
                "tool_name": {
                    "type": ["string", "null"],
                    "description": "On a tool message: the tool it answers (filled in from"
                    " the pending call when absent). Ignored on other roles.",
                },
            },
        },
        "ChatRequest": {
            "type": "object",
            "required": ["appID", "model", "messages"],
            "properties": {
                "appID": {
                    **APP_ID.schema(),
                    "description": "The app's bundle id or package name: the conversation.",
                },
                "model": {**MODEL.schema(), "examples": ["gemma3:270m"]},
                "messages": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": max_messages,
                    "items": ref("Message"),
                },
                "stream": {"description": "Ignored, whatever it is: replies always stream."},
                "options": {"type": ["object", "null"], **optional},
                "format": {"type": ["string", "object", "null"], **optional},
                "keep_alive": {"type": ["string", "number", "null"], **optional},
                "think": {
                    "anyOf": [
                        {"type": ["boolean", "null"]},
                        {"enum": [v for v in checks.THINK_VALUES if isinstance(v, str)]},
                    ],
                    **optional,
                },
            },
        },
        "ToolsRequest": {
            "allOf": [ref("ChatRequest")],
            "properties": {"tools": {"type": ["array", "null"], "items": ref("Tool")}},
        },
        "Tool": {
            "type": "object",
            "required": ["function"],
            "properties": {
                "type": {"const": "function"},
                "function": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {**TOOL_NAME.schema(), "not": {"enum": list(toolbox.TOOLBOX)}},
                        "description": {"type": "string"},
                        "parameters": {"type": ["object", "null"]},
                    },
                },
            },
        },
        "PromptRequest": {
            "type": "object",
            "description": "Ollama's /api/generate request; any of its fields rides along.",
            "required": ["model"],
            "properties": {
                "model": MODEL.schema(),
                "prompt": {"type": "string"},
                "suffix": {"type": "string"},
                "system": {"type": "string"},
                "template": {"type": "string"},
                "images": {"type": "array", "items": {"type": "string"}},
                "format": {"type": ["string", "object"]},
                "options": {"type": "object"},
                "stream": {"type": "boolean"},
                "raw": {"type": "boolean"},
                "keep_alive": {"type": ["string", "number"]},
                "think": {"type": ["boolean", "string"]},
                "context": {"type": "array", "items": {"type": "integer"}},
            },
        },
    }


ANSWER_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "Conversation": {
        "type": "object",
        "required": ["appID", "messages", "next"],
        "properties": {
            "appID": {"type": "string"},
            "messages": {"type": "array", "items": ref("StoredMessage")},
            "next": {"type": ["integer", "null"], "description": "`after` for the next page."},
        },
    },
    "StoredMessage": {
        "type": "object",
        "required": ["role", "content", "tool_calls", "tool_name", "created_at", "seq"],
        "properties": {
            "role": {"enum": list(ROLES)},
            "content": {"type": "string"},
            "tool_calls": {"type": ["array", "null"], "items": ref("ToolCall")},
            "tool_name": {"type": ["string", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
            "seq": {"type": "integer"},
        },
    },
    "Stopped": {
        "type": "object",
        "required": ["appID", "stopped"],
        "properties": {"appID": {"type": "string"}, "stopped": {"const": True}},
    },
    "Models": {
        "type": "object",
        "required": ["models"],
        "properties": {
            "models": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "loaded"],
                    "properties": {"name": {"type": "string"}, "loaded": {"type": "boolean"}},
                },
            }
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "database", "ollama", "streams", "queue"],
        "properties": {
            "status": {"enum": ["ok", "degraded"]},
            "database": {
                "type": "object",
                "required": ["reachable"],
                "properties": {
                    "reachable": {"type": "boolean"},
                    "error": {"type": "string"},
                    "connections_in_use": {"type": "integer"},
                },
            },
            "ollama": {
                "type": "object",
                "required": ["reachable", "servers"],
                "properties": {
                    "reachable": {"type": "boolean"},
                    "version": {"type": ["string", "null"]},
                    "servers": {"type": "array", "items": ref("OllamaServer")},
                },
            },
            "streams": {"type": "integer", "description": "Replies being produced now."},
            "queue": {
                "type": "object",
                "required": ["waiting"],
                "properties": {"waiting": {"type": "integer"}},
            },
        },
    },
    "OllamaServer": {
        "type": "object",
        "required": ["url", "up", "models", "loaded", "in_flight"],
        "properties": {
            "url": {"type": "string"},
            "up": {"type": "boolean"},
            "version": {"type": ["string", "null"]},
            "models": {"type": ["array", "null"], "items": {"type": "string"}},
            "loaded": {"type": "array", "items": {"type": "string"}},
            "in_flight": {"type": "integer"},
            "error": {"type": "string"},
        },
    },
}


def app_id(where: str) -> dict[str, Any]:
    return {"name": "appID", "in": where, "required": True, "schema": APP_ID.schema()}


def _links(resume: str) -> dict[str, Any]:
    """Where a chat's appID leads: its conversation, its stream again, stopping it, forgetting."""
    from_body = "$request.body#/appID"
    return {
        "conversation": {"operationId": "getConversation", "parameters": {"appID": from_body}},
        "resume": {"operationId": resume, "parameters": {"appID": from_body}},
        "stop": {"operationId": "stopTurn", "parameters": {"appID": from_body}},
        "forget": {"operationId": "forgetConversation", "parameters": {"appID": from_body}},
    }


CHAT_ERRORS = {
    "400": error("The body is not valid JSON (or UTF-8), or Ollama refused the request."),
    "404": error("The model is on no Ollama server."),
    "409": error("Another request for this appID has been running for too long."),
    "413": error("The body is larger than CHATTERD_MAX_BODY_BYTES."),
    "422": error("A field is missing or wrong; the error names it."),
    "429": error("This client has CHATTERD_QUEUE_PER_CLIENT requests waiting.", True),
    "502": error("No Ollama server could run it: unreachable, timed out, or failed."),
    "503": error(
        "The database is unavailable, the queue is full (CHATTERD_QUEUE_MAX),"
        " Ollama is busy, or chatterd is shutting down."
    ),
}


def resume(operation_id: str) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": "Resume a reply's stream: the events after Last-Event-ID, then the rest live.",
        "description": "Without Last-Event-ID, the appID's newest reply (running or finished)"
        " from its start. Works from any worker and any host; events are kept for"
        " CHATTERD_EVENTS_KEEP seconds.",
        "parameters": [
            app_id("query"),
            {"name": "Last-Event-ID", "in": "header", "schema": EVENT_ID.schema()},
            {
                "name": "lastEventId",
                "in": "query",
                "description": "Last-Event-ID for clients that cannot set headers; the header"
                " wins.",
                "schema": EVENT_ID.schema(),
            },
        ],
        "responses": {
            "200": {"description": SSE_DESCRIPTION, "content": sse_stream(False)["content"]},
            "204": {"description": "Nothing more to send: the client has the whole reply."},
            "404": error("No reply to resume, or its events have expired."),
            "422": error("appID, Last-Event-ID or lastEventId is wrong."),
            "503": error("The database is unavailable."),
        },
    }


def chat(operation_id: str, summary: str, body: str, resume_id: str, secured: bool) -> dict:
    return {
        "operationId": operation_id,
        "summary": summary,
        "requestBody": {"required": True, "content": json_content(ref(body))},
        "responses": {
            "200": {**sse_stream(secured), "links": _links(resume_id)},
            **CHAT_ERRORS,
        },
    }


def paths(secured: bool) -> dict[str, Any]:
    return {
        "/llmprompt": {
            "post": {
                "operationId": "prompt",
                "summary": "One prompt to Ollama's /api/generate, relayed as it streams.",
                "description": "It waits its turn in the queue silently. A client that goes"
                " away stops the generation. Nothing is stored.",
                "requestBody": {"required": True, "content": json_content(ref("PromptRequest"))},
                "responses": {
                    "200": {
                        "description": "Ollama's answer, byte for byte: NDJSON as it streams,"
                        ' or one JSON object with `"stream": false`.',
                        "content": {
                            "application/x-ndjson": {
                                "itemSchema": ref("GenerateStreamLine"),
                                "schema": {"type": "array", "items": ref("GenerateStreamLine")},
                            },
                            "application/json": {"schema": ref("GenerateLine")},
                        },
                    },
                    "400": error("The body is not valid JSON, or Ollama refused it."),
                    "404": error("The model is on no Ollama server."),
                    "413": error("The body is larger than CHATTERD_MAX_BODY_BYTES."),
                    "422": error("The body is not a JSON object, or model is wrong."),
                    "429": CHAT_ERRORS["429"],
                    "502": CHAT_ERRORS["502"],
                    "503": error("The queue is full (CHATTERD_QUEUE_MAX), or Ollama is busy."),
                },
            }
        },
        "/llmchat": {
            "post": chat(
                "chat",
                "Chat: the appID's conversation to Ollama, the reply streamed.",
                "ChatRequest",
                "resumeChat",
                secured,
            ),
            "get": resume("resumeChat"),
        },
        "/llmtools": {
            "post": chat(
                "chatWithTools",
                "Chat with tools: the server's own and the device's.",
                "ToolsRequest",
                "resumeTools",
                secured,
            ),
            "get": resume("resumeTools"),
        },
        "/conversations/{appID}": {
            "get": {
                "operationId": "getConversation",
                "summary": "The stored conversation, oldest first, a page at a time.",
                "parameters": [
                    app_id("path"),
                    {"name": "limit", "in": "query", "schema": PAGE_LIMIT.schema()},
                    {
                        "name": "after",
                        "in": "query",
                        "description": "The `next` of the previous page.",
                        "schema": PAGE_AFTER.schema(),
                    },
                ],
                "responses": {
                    "200": json_answer("One page; `next` is null on the last.", "Conversation"),
                    "404": error("Nothing is stored for this appID."),
                    "422": error("appID, limit or after is wrong."),
                    "503": error("The database is unavailable."),
                },
            },
            "delete": {
                "operationId": "forgetConversation",
                "summary": "Forget the conversation and the app's device tools.",
                "parameters": [app_id("path")],
                "responses": {
                    "204": {"description": "Deleted (or there was nothing to delete)."},
                    "409": error("A reply for this appID has been running for too long."),
                    "422": error("appID is wrong."),
                    "503": error("The database is unavailable."),
                },
            },
        },
        "/conversations/{appID}/stop": {
            "post": {
                "operationId": "stopTurn",
                "summary": "Stop the appID's running or waiting turn, on whichever host runs it.",
                "description": "A running generation is closed at once (Ollama stops) and what"
                " was said so far is stored as the reply; a waiting turn leaves the queue and"
                " is not stored. The stream ends with an Ollama line whose done_reason is"
                " `stopped`. Answers once the turn has ended (up to 5 s).",
                "parameters": [app_id("path")],
                "responses": {
                    "200": json_answer("The turn was stopped.", "Stopped"),
                    "404": error("No turn of this appID is running or waiting."),
                    "422": error("appID is wrong."),
                    "503": error("The database is unavailable."),
                },
            }
        },
        "/weather": {
            "get": {
                "operationId": "weather",
                "summary": "The temperature at a place.",
                "description": "Coordinates as query parameters, or as the tutorial sends"
                ' them: a JSON body `{"lat": "42.28", "lon": "-83.74"}` with the GET (numbers or'
                " numeric strings), when there are no query parameters.",
                "parameters": [
                    {
                        "name": "lat",
                        "in": "query",
                        "required": True,
                        "schema": LATITUDE.schema(),
                        "example": 42.28,
                    },
                    {
                        "name": "lon",
                        "in": "query",
                        "required": True,
                        "schema": LONGITUDE.schema(),
                        "example": -83.74,
                    },
                ],
                "responses": {
                    "200": {
                        "description": "A sentence about the weather.",
                        "content": json_content({"type": "string"}),
                    },
                    "400": error("The body is not valid JSON."),
                    "413": error("The body is larger than CHATTERD_MAX_BODY_BYTES."),
                    "422": error("Coordinates missing, not numbers, or out of range."),
                    "502": error("Open-Meteo failed, timed out or can't be reached."),
                },
            }
        },
        "/models": {
            "get": {
                "operationId": "models",
                "summary": "The models the Ollama servers that are up have, and if one has it"
                " loaded.",
                "responses": {"200": json_answer("The models, by name.", "Models")},
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "Whether the database answers; the Ollama servers' last known state.",
                "responses": {
                    "200": json_answer("The database answers.", "Health"),
                    "503": json_answer("The database does not answer.", "Health"),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics, summed over every worker.",
                "responses": {
                    "200": {
                        "description": "Prometheus' text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.2",
                        "content": json_content({"type": "object"}),
                    }
                },
            }
        },
        "/playground": {
            "get": {
                "operationId": "playground",
                "summary": "A page to try this chatterd in a browser.",
                "responses": {
                    "200": {
                        "description": "One self-contained HTML page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }


UNAUTHORIZED = {
    "description": "No API key, or a wrong one.",
    "headers": {
        "WWW-Authenticate": {"required": True, "schema": {"type": "string", "pattern": "^Bearer"}}
    },
    "content": json_content(ref("Error")),
}


def secure(document: dict[str, Any], metrics_key: bool) -> None:
    """With CHATTERD_API_KEYS, every route but the open ones needs a key, or answers 401;
    a resumed stream may show a resume token instead, and /metrics its own key if set."""
    document["security"] = [{"apiKey": []}]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if path in OPEN_PATHS:
                operation["security"] = []
                continue
            operation["responses"]["401"] = UNAUTHORIZED
            if method == "get" and path in ("/llmchat", "/llmtools"):
                operation["security"] = [{"apiKey": []}, {"resumeToken": []}]
            if path == "/metrics" and metrics_key:
                operation["security"] = [{"metricsKey": []}]


def document(config: Any) -> dict[str, Any]:
    found: dict[str, Any] = {
        "openapi": "3.2.0",
        "info": {
            "title": "chatterd",
            "version": "0.2.0",
            "description": (
                "A self-hosted backend for LLM chat apps: conversations kept in PostgreSQL,"
                " replies streamed from Ollama as Server-Sent Events, tools for the model,"
                " one fair queue in front of the Ollama servers."
            ),
        },
        "paths": paths(bool(config.api_keys)),
        "components": {
            "schemas": {**STREAM_SCHEMAS, **request_schemas(config.max_messages), **ANSWER_SCHEMAS},
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer"},
                "resumeToken": {"type": "apiKey", "in": "query", "name": "token"},
                "metricsKey": {"type": "http", "scheme": "bearer"},
            },
        },
    }
    if config.api_keys:
        secure(found, bool(config.metrics_key))
    elif config.metrics_key:
        found["paths"]["/metrics"]["get"]["security"] = [{"metricsKey": []}]
        found["paths"]["/metrics"]["get"]["responses"]["401"] = UNAUTHORIZED
    return found
