"""How one turn of /llmtools uses tools: what is offered, what runs, what the client sees.

The model's calls are of three kinds: the server's own tools (toolbox.py), which run here;
the app's device tools, which the app runs (the pipeline forwards them); and names that are
neither, which are answered with an error. Each server call shows on the stream as it
starts (`event: tool_call`) and when it answers (`event: tool_result`), shaped as Ollama
lines with no content, so apps that don't know these events ignore them.

Small models loop: they call the same tool with the same arguments again and again. Such a
repeated call is answered with the answer already given in this turn, without running the
tool again; once a call has been made `repeats` times, tools are withdrawn for the rest of
the turn, so that the model has to answer in words (`event: notice` says so).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import metrics
import toolbox
from ollama import Message, empty_line, function_name

log = logging.getLogger("chatterd")

Send = Callable[[str, bytes], None]  # an event's name and data, to the client


class ToolUse:
    def __init__(
        self,
        env: toolbox.ToolEnv,
        device_tools: list[dict[str, Any]],
        *,
        model: str,
        repeats: int,
        send: Send,
    ) -> None:
        self._env = env
        self.device_names = {function_name(t) for t in device_tools} - toolbox.TOOLBOX.keys()
        resident = [tool.schema for tool in toolbox.TOOLBOX.values()]
        device = [t for t in device_tools if function_name(t) not in toolbox.TOOLBOX]
        self._offered = resident + device
        self._model = model
        self._repeats = repeats
        self._send = send
        self._answers: dict[str, str] = {}  # a call's key -> its answer, in this turn
        self._made: dict[str, int] = {}  # a call's key -> how often the model made it
        self.tried: list[dict[str, Any]] = []  # each server call, for the empty-reply notice
        self.withdrawn = False

    @property
    def offered(self) -> list[dict[str, Any]]:
        """The tool declarations for the next round: none once tools are withdrawn."""
        return [] if self.withdrawn else self._offered

    def is_device_call(self, call: dict[str, Any]) -> bool:
        return function_name(call) in self.device_names

    async def answer(self, calls: list[dict[str, Any]]) -> list[Message]:
        """The results of the calls the server answers (all but the device's), in call order.

        New calls run concurrently; a call already answered in this turn gets that answer.
        """
        answered = [call for call in calls if not self.is_device_call(call)]
        for _ in range(len(calls) - len(answered)):
            metrics.tool_call("device", "forwarded")  # the app runs them
        keys = [_key(call) for call in answered]
        fresh = {}
        for call, key in zip(answered, keys, strict=True):
            self._made[key] = self._made.get(key, 0) + 1
            self._tell("tool_call", tool_call=_shown(call))
            if key not in self._answers and key not in fresh:
                fresh[key] = self._run(call)
                self.tried.append(_shown(call))
        ran = dict(zip(fresh, await asyncio.gather(*fresh.values()), strict=True))
        results = []
        for call, key in zip(answered, keys, strict=True):
            name = function_name(call)
            reused = key in self._answers
            content = self._answers[key] if reused else ran[key]
            if reused:
                metrics.tool_call(_label(name), "reused")
            self._answers[key] = content
            self._tell(
                "tool_result",
                tool_result={
                    "name": name,
                    "content": content,
                    "error": content.startswith("Error:"),
                    "reused": reused,
                },
            )
            results.append(Message("tool", content, tool_name=name))
        looping = [key for key in keys if self._made[key] >= self._repeats]
        if looping and not self.withdrawn:
            name = function_name(answered[keys.index(looping[0])])
            self.withdraw(
                "repeated_call",
                f"the model called {name} {self._made[looping[0]]} times with the same"
                " arguments; tools are no longer offered in this turn, so that it answers",
            )
        return results

    def withdraw(self, reason: str, text: str) -> None:
        self.withdrawn = True
        self._tell("notice", notice={"kind": "tools_withdrawn", "reason": reason, "text": text})

    def tell_empty_reply(self, rounds: int) -> None:
        """The model said nothing after tool rounds: say so, and what was tried."""
        self._tell(
            "notice",
            notice={
                "kind": "empty_reply",
                "text": f"the model gave no answer after {rounds} tool round(s)",
                "tried": self.tried,
            },
        )

    def tell_ignored_calls(self, calls: list[dict[str, Any]]) -> None:
        """The model called tools in a round that offered none: the calls are not run."""
        self._tell(
            "notice",
            notice={
                "kind": "calls_ignored",
                "text": "the model called tools, but none are offered in this round;"
                " the calls were not run",
                "calls": [_shown(call) for call in calls],
            },
        )

    def _tell(self, event: str, **fields: Any) -> None:
        self._send(event, empty_line(self._model, **fields))

    async def _run(self, call: dict[str, Any]) -> str:
        name = function_name(call)
        if name not in toolbox.TOOLBOX:
            metrics.tool_call("unknown", "error")
            return f"Error: there is no tool named {name!r}."
        try:
            result = await toolbox.run(self._env, name, call["function"].get("arguments"))
        except toolbox.ToolError as exc:
            metrics.tool_call(name, "error")
            return f"Error: {exc}"
        except Exception:
            log.exception("resident tool %s failed", name)
            metrics.tool_call(name, "error")
            return f"Error: the tool {name} failed unexpectedly."
        metrics.tool_call(name, "ok")
        return result


def _key(call: dict[str, Any]) -> str:
    """Calls with the same name and arguments (in any key order) have the same key."""
    arguments = call.get("function", {}).get("arguments") if isinstance(call, dict) else None
    return json.dumps([function_name(call), arguments], sort_keys=True, default=str)


def _shown(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    return {"name": function_name(call), "arguments": arguments}


def _label(name: str) -> str:
    return name if name in toolbox.TOOLBOX else "unknown"
