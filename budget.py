"""The context budget: how much of a conversation is sent to the model.

Ollama cuts a history longer than its context window from the front, silently. chatterd
cuts it first, by rules it can tell the client about: system messages are always sent; the
newest messages are kept, as whole units (an assistant message that calls tools together
with the tools' results, so a call is never separated from its result); a trimmed history
starts at a user message; and the request's own messages are always sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ollama import Message

CHARS_PER_TOKEN = 4  # a rough average for English text; no tokenizer needed
TOKENS_PER_MESSAGE = 4  # what a chat template adds around each message


@dataclass(frozen=True)
class Budget:
    """At most this many messages, and about this many tokens, go to the model."""

    max_messages: int
    max_tokens: int


@dataclass
class Fitted:
    messages: list[Message]  # what is sent, in order
    omitted: int  # how many of the conversation's messages were left out
    tokens: int  # estimated size of what is sent


def approx_tokens(message: Message) -> int:
    size = len(message.content)
    if message.tool_calls:
        size += len(json.dumps(message.tool_calls))
    return size // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE


def context_window(ollama_fields: dict[str, Any], default: int) -> int:
    """The context window a request runs with: its `options.num_ctx`, else the default."""
    options = ollama_fields.get("options")
    num_ctx = options.get("num_ctx") if isinstance(options, dict) else None
    if isinstance(num_ctx, int) and not isinstance(num_ctx, bool) and num_ctx > 0:
        return num_ctx
    return default


def fit(messages: list[Message], new: int, budget: Budget, unread: int = 0) -> Fitted:
    """The part of `messages` to send; the last `new` messages (this request's) always go.

    `unread` counts older messages the store did not even read (it reads a window of the
    newest), so the history is already cut when it is positive.
    """
    split = len(messages) - new
    while 0 < split < len(messages) and messages[split].role == "tool":
        split -= 1  # results this request brings go with the call they answer
    older, kept_new = messages[:split], messages[split:]
    system = [message for message in older if message.role == "system"]
    count = len(system) + len(kept_new)
    tokens = sum(approx_tokens(message) for message in [*system, *kept_new])
    kept: list[list[Message]] = []
    for unit in reversed(_units(older)):
        size = sum(approx_tokens(message) for message in unit)
        if count + len(unit) > budget.max_messages or tokens + size > budget.max_tokens:
            break
        kept.insert(0, unit)
        count += len(unit)
        tokens += size
    dropped = len(older) - len(system) - sum(len(unit) for unit in kept)
    if not dropped and not unread:
        return Fitted(messages, 0, tokens)
    while kept and kept[0][0].role != "user":
        dropped += len(kept.pop(0))
    sent = [*system, *(message for unit in kept for message in unit), *kept_new]
    return Fitted(sent, unread + dropped, sum(approx_tokens(message) for message in sent))


def _units(messages: list[Message]) -> list[list[Message]]:
    """Non-system messages grouped so that tool results stay with the call they answer."""
    units: list[list[Message]] = []
    for message in messages:
        if message.role == "system":
            continue
        if message.role == "tool" and units and _calls_tools(units[-1][0]):
            units[-1].append(message)
        else:
            units.append([message])
    return units


def _calls_tools(message: Message) -> bool:
    return message.role == "assistant" and bool(message.tool_calls)
