"""The OpenAPI 3.1 description of chatterd's routes, served at GET /openapi.json.

Postman imports it; the test suite validates it and runs schemathesis against it.
"""

from __future__ import annotations

from typing import Any

from handlers import MAX_APP_ID
from ollama import ROLES


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json_body(schema: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


SSE_STREAM = {
    "description": (
        "A stream of Server-Sent Events, each with an `id:` that increases within the appID"
        " (resume a lost stream with GET and `Last-Event-ID`). Each plain `data:` event is"
        " one line of Ollama's /api/chat stream, unchanged. `event: tool_calls` carries an"
        " Ollama line that calls a device tool (the app runs it and posts the result);"
        " `event: context` says what part of the history was left out of the prompt;"
        ' `event: error` carries `{"error": "..."}` when something fails after the stream'
        " has started."
    ),
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


def _app_id(where: str) -> dict[str, Any]:
    """The appID as a parameter: in the query, or in the path."""
    return {
        "name": "appID",
        "in": where,
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_APP_ID},
    }


RESUME = {
    "summary": "Resume a reply's stream: the events after Last-Event-ID, then the rest live.",
    "description": (
        "Without Last-Event-ID, the appID's newest reply (running or finished) from its start."
        " Works from any worker; events are kept for CHATTERD_EVENTS_KEEP seconds."
    ),
    "parameters": [
        _app_id("query"),
        {
            "name": "Last-Event-ID",
            "in": "header",
            "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
        },
    ],
    "responses": {
        "200": SSE_STREAM,
        "204": {"description": "Nothing more to send: the client has the whole reply."},
        "404": _error("No reply to resume, or its events have expired."),
        "422": _error("appID or Last-Event-ID is missing or wrong."),
        "503": _error("The database is unavailable."),
    },
}

CHAT_ERRORS = {
    "400": _error("The body is not valid JSON or not UTF-8."),
    "404": _error("The model is not installed in Ollama."),
    "409": _error("Another request for this appID has been running for too long."),
    "413": _error("The body is larger than the limit."),
    "422": _error("A field is missing or wrong; the error names it."),
    "429": _error("This client has too many requests waiting (CHATTERD_QUEUE_PER_CLIENT)."),
    "502": _error("Ollama can't be reached or timed out."),
    "503": _error("The database is unavailable, the queue is full, or Ollama is busy."),
}

MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"enum": list(ROLES)},
        "content": {"type": "string"},
        "tool_name": {"type": "string", "description": "On a tool message: the tool it answers."},
    },
}

CHAT_REQUEST = {
    "type": "object",
    "required": ["appID", "model", "messages"],
    "properties": {
        "appID": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_APP_ID,
            "description": "The app's bundle id or package name: the conversation.",
        },
        "model": {"type": "string", "minLength": 1, "examples": ["gemma3:270m"]},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {"$ref": "#/components/schemas/Message"},
        },
        "stream": {"type": "boolean", "description": "Ignored: replies are always streamed."},
        "options": {"type": "object", "description": "Ollama's model options, passed on."},
        "format": {"oneOf": [{"type": "string"}, {"type": "object"}]},
        "keep_alive": {"oneOf": [{"type": "string"}, {"type": "number"}]},
        "think": {"oneOf": [{"type": "boolean"}, {"enum": ["low", "medium", "high"]}]},
    },
}

TOOL = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "description": {"type": "string"},
                "parameters": {"oneOf": [{"type": "object"}, {"type": "null"}]},
            },
        },
    },
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chatterd",
            "version": "0.1.0",
            "description": (
                "A self-hosted backend for LLM chat apps: conversations kept in PostgreSQL,"
                " replies streamed from Ollama as Server-Sent Events, tools for the model."
                " When the server sets CHATTERD_API_KEYS, every route but /health needs"
                " `Authorization: Bearer <key>`."
            ),
        },
        "paths": {
            "/llmprompt": {
                "post": {
                    "summary": "One prompt to Ollama's /api/generate, relayed as it streams.",
                    "requestBody": _json_body("PromptRequest"),
                    "responses": {
                        "200": {
                            "description": "Ollama's NDJSON stream, byte for byte.",
                            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                        },
                        "400": _error("The body is not valid JSON, or Ollama refused it."),
                        "404": _error("The model is not installed in Ollama."),
                        "413": _error("The body is larger than the limit."),
                        "422": _error("The body is not a JSON object."),
                        "502": _error("Ollama can't be reached or timed out."),
                    },
                }
            },
            "/llmchat": {
                "post": {
                    "summary": "Chat: the appID's conversation to Ollama, the reply streamed.",
                    "requestBody": _json_body("ChatRequest"),
                    "responses": {"200": SSE_STREAM, **CHAT_ERRORS},
                },
                "get": RESUME,
            },
            "/llmtools": {
                "post": {
                    "summary": "Chat with tools: the server's own and the device's.",
                    "requestBody": _json_body("ToolsRequest"),
                    "responses": {"200": SSE_STREAM, **CHAT_ERRORS},
                },
                "get": RESUME,
            },
            "/conversations/{appID}": {
                "get": {
                    "summary": "The stored conversation, oldest first, a page at a time.",
                    "parameters": [
                        _app_id("path"),
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                        {
                            "name": "after",
                            "in": "query",
                            "description": "The `next` of the previous page.",
                            "schema": {"type": "integer", "minimum": 0},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "One page of messages; `next` is null on the last.",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Conversation"}
                                }
                            },
                        },
                        "422": _error("appID, limit or after is wrong."),
                        "503": _error("The database is unavailable."),
                    },
                },
                "delete": {
                    "summary": "Forget the conversation and the app's device tools.",
                    "parameters": [_app_id("path")],
                    "responses": {
                        "204": {"description": "Deleted (or there was nothing to delete)."},
                        "409": _error("A reply for this appID has been running for too long."),
                        "422": _error("appID is wrong."),
                        "503": _error("The database is unavailable."),
                    },
                },
            },
            "/conversations/{appID}/stop": {
                "post": {
                    "summary": "Stop the appID's running or waiting turn.",
                    "description": (
                        "A running turn's generation is closed at once and what was said so far"
                        " is stored as the reply; a waiting turn leaves the queue and is not"
                        " stored. The stream ends with an Ollama line whose done_reason is"
                        " `stopped`. Answers once the turn has ended (up to 5 s)."
                    ),
                    "parameters": [_app_id("path")],
                    "responses": {
                        "200": {
                            "description": "The turn was stopped.",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Stopped"}
                                }
                            },
                        },
                        "404": _error("No turn of this appID is running or waiting."),
                        "422": _error("appID is wrong."),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics, summed over every worker.",
                    "responses": {
                        "200": {
                            "description": "Prometheus' text format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/weather": {
                "get": {
                    "summary": "The temperature at a place (a JSON body, or query parameters).",
                    "parameters": [
                        {
                            "name": "lat",
                            "in": "query",
                            "schema": {"type": "string"},
                            "examples": {"ann-arbor": {"value": "42.28"}},
                        },
                        {
                            "name": "lon",
                            "in": "query",
                            "schema": {"type": "string"},
                            "examples": {"ann-arbor": {"value": "-83.74"}},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "A sentence about the weather.",
                            "content": {"application/json": {"schema": {"type": "string"}}},
                        },
                        "400": _error("The body is not valid JSON."),
                        "422": _error("Coordinates missing, not numbers, or out of range."),
                        "502": _error("Open-Meteo failed, timed out or can't be reached."),
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "Whether the database and Ollama answer.",
                    "responses": {
                        "200": {
                            "description": "The database answers.",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Health"}
                                }
                            },
                        },
                        "503": {
                            "description": "The database does not answer.",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Health"}
                                }
                            },
                        },
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "responses": {
                        "200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Message": MESSAGE,
                "ChatRequest": CHAT_REQUEST,
                "ToolsRequest": {
                    "allOf": [{"$ref": "#/components/schemas/ChatRequest"}],
                    "properties": {
                        "tools": {"type": "array", "items": {"$ref": "#/components/schemas/Tool"}}
                    },
                },
                "Tool": TOOL,
                "PromptRequest": {
                    "type": "object",
                    "required": ["model", "prompt"],
                    "properties": {
                        "model": {"type": "string"},
                        "prompt": {"type": "string"},
                        "stream": {"type": "boolean"},
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status", "database", "ollama"],
                    "properties": {
                        "status": {"enum": ["ok", "degraded"]},
                        "database": {"type": "object"},
                        "ollama": {"type": "object"},
                        "streams": {"type": "integer"},
                    },
                },
                "Conversation": {
                    "type": "object",
                    "required": ["appID", "messages", "next"],
                    "properties": {
                        "appID": {"type": "string"},
                        "messages": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/StoredMessage"},
                        },
                        "next": {"type": ["integer", "null"]},
                    },
                },
                "StoredMessage": {
                    "type": "object",
                    "properties": {
                        "role": {"enum": list(ROLES)},
                        "content": {"type": "string"},
                        "tool_calls": {"type": ["array", "null"]},
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
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
            },
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }
