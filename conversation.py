"""The chat pipeline shared by /llmchat and /llmtools.

A request flows one way: it waits for its appID's lease (one turn at a time per
conversation, leases.py); the newest history is read, and the request's messages put after
it; that, within the context budget (budget.py), goes to Ollama through the admission
queue (admission.py), which also picks the server; each line Ollama streams is relayed to
the client as it arrives; the whole turn is stored, the request with its reply. On
/llmtools the model's tool calls are answered (tooluse.py) or forwarded to the app, and
the model is asked again.

The pipeline runs as a task of its own that writes events to an Outbox (outbox.py), which
the HTTP response reads and the event log keeps. A client that goes away therefore stops
nothing: the reply is still completed and stored, so the next request sees a whole
history. What stops a turn is its stop button (TurnControl), pressed by
POST /conversations/{appID}/stop on whichever worker the turn runs.

A turn is all or nothing: it is stored in one statement once it is over, so when it fails
(Ollama refuses or breaks off, a line is not JSON, the database refuses the reply or its
lease is lost) the stored conversation stays as it was before the request. A stopped
turn keeps what was said.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import budget
import metrics
import toolbox
from admission import Admission, Shed
from budget import Budget
from bus import Bus
from database import StoreError
from events import EventLog
from history import History, Turn
from leases import ConversationBusy, Leases
from ollama import Message, OllamaError, Reply, empty_line, function_name
from outbox import Event, Outbox
from servers import NoServer
from tooluse import ToolUse

log = logging.getLogger("chatterd")
T = TypeVar("T")

SHUTTING_DOWN = "chatterd is shutting down; the reply was not stored"
LEASE_LOST = "the connection to the database was lost; the reply was not stored"
STOP_CHECK_SECONDS = 0.5  # how often a stop of another worker's turn looks whether it ended


@dataclass
class ChatRequest:
    """A validated /llmchat or /llmtools request."""

    app_id: str
    model: str
    messages: list[Message]
    ollama_fields: dict[str, Any] = field(default_factory=dict)  # options, format, keep_alive...
    declared_tools: list[dict[str, Any]] | None = None  # device tools sent with this request
    with_tools: bool = False  # /llmtools: offer resident and device tools
    client: str = ""  # who asks, for the admission queue's turns
    received: float = 0.0  # the event loop's time when the request arrived

    @property
    def route(self) -> str:
        return "/llmtools" if self.with_tools else "/llmchat"


class StreamError(Exception):
    """Ollama's stream said something chatterd cannot relay as a reply."""

    status = 502


class Stopped(Exception):
    """The turn's stop button was pressed (POST /conversations/{appID}/stop)."""


STOPPED_TOOL = "Error: the turn was stopped before this tool answered."


class TurnControl:
    """A running turn's stop button: pressing it interrupts what the turn is waiting for.

    The turn runs its interruptible parts (waiting in the queue, streaming a round,
    running tools) through `interruptible`, each as a task of its own that a press
    cancels; the turn itself goes on, to store what was said and end the stream.
    """

    def __init__(self) -> None:
        self.reply = 0  # the turn's reply number, once it holds its lease
        self.pressed = False
        self.failure: Exception | None = None  # why the turn can't go on (its lease is lost)
        self.ended = asyncio.Event()
        self._current: asyncio.Task[Any] | None = None

    def press(self) -> None:
        self.pressed = True
        if self._current is not None:
            self._current.cancel()

    def settle(self) -> None:
        """What the turn awaits now can no longer be stopped (a round has its done line):
        a press from now on lands at the next interruptible part."""
        self._current = None

    def abort(self, failure: Exception) -> None:
        """End the turn with `failure` as soon as it can: nothing more may be stored."""
        self.failure = failure
        if self._current is not None:
            self._current.cancel()

    def check(self) -> None:
        """Before the turn stores anything: raise the failure that aborted it, if any."""
        if self.failure is not None:
            raise self.failure

    async def interruptible(self, work: Coroutine[Any, Any, T]) -> T:
        """Await `work`; raise Stopped if the button is (or gets) pressed meanwhile, or the
        failure that aborts the turn."""
        if self.pressed or self.failure is not None:
            work.close()
            self.check()
            raise Stopped
        task = asyncio.ensure_future(work)
        self._current = task
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:  # the turn itself is cancelled (shutdown)
            task.cancel()
            await asyncio.wait({task})
            raise
        finally:
            self._current = None
        if task.cancelled():
            self.check()
            raise Stopped
        return task.result()


@dataclass(frozen=True)
class Limits:
    max_rounds: int  # model rounds that may call tools, per request; one more answers
    tool_repeats: int  # identical calls in a turn before tools are withdrawn
    history_messages: int  # the context budget: messages sent to the model,
    history_tokens: int | None  # and tokens (None: three quarters of the context window)
    context_window: int  # Ollama's num_ctx when the request does not set one


class Chat:
    """Starts pipelines and keeps track of them until they finish."""

    def __init__(
        self,
        history: History,
        event_log: EventLog,
        leases: Leases,
        admission: Admission,
        messages: Bus,
        tool_env: toolbox.ToolEnv,
        limits: Limits,
    ) -> None:
        self.history = history
        self.event_log = event_log
        self.leases = leases
        self.admission = admission
        self.tool_env = tool_env
        self.limits = limits
        self._bus = messages
        self._running: set[asyncio.Task[None]] = set()
        self._turns: dict[str, TurnControl] = {}  # this worker's turns that hold their lease
        self._stops_early: set[str] = set()  # stops for turns still taking their lease
        messages.handle("stop", self._press)

    @property
    def running(self) -> int:
        """How many pipelines are running, streamed to a client or not."""
        return len(self._running)

    def start(self, request: ChatRequest) -> Outbox:
        outbox = Outbox(request.app_id, self.event_log)
        task = asyncio.create_task(self._run(request, outbox))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return outbox

    async def stop(self, app_id: str, wait: float) -> bool:
        """Stop the appID's turn, on whichever worker or host runs it, and wait up to `wait`
        seconds for it to end (its reply stored). False when no turn of the appID runs."""
        if control := self._turns.get(app_id):
            control.press()
            try:
                async with asyncio.timeout(wait):
                    await control.ended.wait()
            except TimeoutError:
                log.warning("a stopped turn did not end within %g s", wait)
            return True
        if not await self.leases.held_anywhere(app_id):
            return False
        with self._bus.watch("free", app_id) as freed:
            await self._bus.send(f"stop {app_id}")
            try:
                async with asyncio.timeout(wait):
                    while not freed.is_set() and await self.leases.held_anywhere(app_id):
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(STOP_CHECK_SECONDS):
                                await freed.wait()
            except TimeoutError:
                log.warning("a stopped turn on another worker did not end within %g s", wait)
        return True

    def _press(self, app_id: str) -> None:
        """A stop for the appID (from any worker): press the button if the turn runs here,
        or as soon as it has its lease if it is taking it here now."""
        if control := self._turns.get(app_id):
            control.press()
        elif self.leases.taking(app_id):
            self._stops_early.add(app_id)

    async def finish(self, grace: float) -> None:
        """Let running pipelines finish for up to `grace` seconds, then cancel the rest."""
        if not self._running:
            return
        _, unfinished = await asyncio.wait(set(self._running), timeout=grace)
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished)

    async def _run(self, request: ChatRequest, outbox: Outbox) -> None:
        control = TurnControl()
        try:
            async with self.leases.hold(
                request.app_id, lambda: control.abort(StoreError(LEASE_LOST))
            ) as reply:
                control.reply = reply
                outbox.begin(reply)
                self._turns[request.app_id] = control
                if request.app_id in self._stops_early:  # pressed while it took the lease
                    self._stops_early.discard(request.app_id)
                    control.press()
                try:
                    await self._turn(request, outbox, control)
                except asyncio.CancelledError:
                    outbox.fail(503, SHUTTING_DOWN)  # before the END below: resumers hear it
                    raise
                finally:
                    del self._turns[request.app_id]
                    outbox.end()
                    # Resumed streams must find the END before the lease goes.
                    await asyncio.shield(self.event_log.written())
                    control.ended.set()
        except (ConversationBusy, StoreError) as exc:
            metrics.error("busy" if isinstance(exc, ConversationBusy) else "database")
            outbox.fail(exc.status, str(exc))
        except asyncio.CancelledError:
            outbox.fail(503, SHUTTING_DOWN)
            raise
        except Exception:
            log.exception("chat pipeline failed")
            metrics.error("internal")
            outbox.fail(500, "internal error in chatterd")
        finally:
            outbox.close()

    async def _turn(self, request: ChatRequest, outbox: Outbox, control: TurnControl) -> None:
        """One turn, all or nothing: it is stored only once it is over (_complete)."""
        try:
            turn = await self.history.record(
                request.app_id,
                request.messages,
                request.declared_tools,
                with_tools=request.with_tools,
            )
            await self._converse(request, turn, outbox, control)
        except (OllamaError, StoreError, StreamError, NoServer, Shed) as exc:
            metrics.error(error_kind(exc))
            outbox.fail(exc.status, str(exc), getattr(exc, "retry_after", None))

    async def _converse(
        self, request: ChatRequest, turn: Turn, outbox: Outbox, control: TurnControl
    ) -> None:
        tools = ToolUse(
            self.tool_env,
            turn.device_tools if request.with_tools else [],
            model=request.model,
            repeats=self.limits.tool_repeats,
            send=outbox.send,
        )
        window = budget.context_window(request.ollama_fields, self.limits.context_window)
        limit = Budget(self.limits.history_messages, self.limits.history_tokens or window * 3 // 4)
        messages, new = turn.history, turn.new
        said: list[tuple[Message, str | None]] = []  # the tool rounds' rows, stored at the end
        told = 0  # how many left-out messages the client has been told of
        for round_number in itertools.count():
            if round_number == self.limits.max_rounds and not tools.withdrawn:
                tools.withdraw(
                    "round_limit",
                    f"the model called tools in {round_number} rounds"
                    " (CHATTERD_MAX_TOOL_ROUNDS); tools are no longer offered, so that it answers",
                )
            offered = tools.offered if request.with_tools else []
            fitted = budget.fit(messages, new, limit, turn.unread)
            notices: list[Event] = []
            if fitted.omitted != told:
                told = fitted.omitted
                trimmed = empty_line(request.model, trimmed=_trimmed(fitted, limit))
                notices.append((None, "context", trimmed))
            reply = Reply()
            try:
                held = await control.interruptible(
                    self._stream_round(
                        request,
                        fitted,
                        window,
                        offered,
                        tools,
                        notices,
                        outbox,
                        reply,
                        control,
                        continuing=round_number > 0,
                    )
                )
            except Stopped:
                if round_number == 0 and not reply.began:  # it never reached Ollama
                    self._end_stopped(request, outbox, "waiting")
                    return
                rows = [(reply.spoken(), reply.thinking)] if reply.began else []
                await self._complete(request, control, turn, [*said, *rows])
                self._end_stopped(request, outbox, "running")
                return
            if reply.tool_calls and not offered:  # called anyway: nothing is run
                tools.tell_ignored_calls(reply.tool_calls)
                await self._complete(
                    request, control, turn, [*said, (reply.spoken(), reply.thinking)]
                )
                return
            if not reply.tool_calls:
                if round_number and not reply.content.strip():
                    tools.tell_empty_reply(round_number)
                await self._complete(
                    request, control, turn, [*said, (reply.as_message(), reply.thinking)]
                )
                return
            call = reply.as_message()
            try:
                results = await control.interruptible(tools.answer(reply.tool_calls))
            except Stopped:
                answered = [c for c in reply.tool_calls if not tools.is_device_call(c)]
                results = [
                    Message("tool", STOPPED_TOOL, tool_name=function_name(c)) for c in answered
                ]
                rows = [(call, reply.thinking), *((result, None) for result in results)]
                await self._complete(request, control, turn, [*said, *rows])
                self._end_stopped(request, outbox, "running")
                return
            said += [(call, reply.thinking), *((result, None) for result in results)]
            if held:
                # Device calls: the app runs them and posts the results as a new request,
                # which must find the call stored; so the events go out only now.
                await self._complete(request, control, turn, said)
                for _, event, data in held:
                    outbox.send(event, data)
                return
            metrics.tool_round()
            control.check()  # a turn that lost its lease goes no further
            messages = [*messages, call, *results]
            new += 1 + len(results)

    async def _complete(
        self,
        request: ChatRequest,
        control: TurnControl,
        turn: Turn,
        rows: list[tuple[Message, str | None]],
    ) -> None:
        """Store the whole turn: the request's messages, then what the model and tools said."""
        control.check()  # a turn that lost its lease must not store
        await self.history.complete(request.app_id, control.reply, turn, rows)

    def _end_stopped(self, request: ChatRequest, outbox: Outbox, state: str) -> None:
        metrics.stopped(state)
        outbox.send(None, empty_line(request.model, done=True, done_reason="stopped"))

    async def _stream_round(
        self,
        request: ChatRequest,
        fitted: budget.Fitted,
        window: int,
        offered: list[dict[str, Any]],
        tools: ToolUse,
        notices: list[Event],
        outbox: Outbox,
        reply: Reply,
        control: TurnControl,
        *,
        continuing: bool,
    ) -> list[Event]:
        """Ask Ollama once, through the admission queue, and relay its lines as they come.

        While the request waits for a slot, `event: queued` tells the client its place.
        `notices` go out just before Ollama's first line, so that a refusal still comes
        as an HTTP status. Fills `reply` as lines come (a stop leaves it partial) and
        returns the events held back: from the first line that calls a device tool on,
        lines wait until the call is stored (see _converse).
        """
        body: dict[str, Any] = {
            **request.ollama_fields,
            "model": request.model,
            "messages": [message.to_wire() for message in fitted.messages],
            "stream": True,
        }
        if offered:
            body["tools"] = offered

        def tell_position(position: int) -> None:
            queued = empty_line(request.model, queued={"position": position})
            outbox.send("queued", queued)

        generation = await self.admission.generate(
            request.client,
            request.model,
            "/api/chat",
            json.dumps(body).encode(),  # ASCII, so that no lone surrogate can break it
            tell_position,
            continuing=continuing,
        )
        reply.began = True
        held: list[Event] = []
        relayed = 0
        try:
            async for line in generation.lines():
                try:
                    # From str, so that json does not sniff for UTF-16 (Ollama writes UTF-8).
                    chunk = json.loads(line.decode())
                except ValueError:  # UnicodeDecodeError too
                    chunk = None
                if not isinstance(chunk, dict):
                    text = line[:200].decode(errors="replace")
                    raise StreamError(f"Ollama sent a line that is not a JSON object: {text}")
                if "error" in chunk:
                    raise StreamError(f"Ollama: {chunk['error']}")
                event = None
                message = chunk.get("message")
                if isinstance(message, dict):
                    reply.add(message)
                    calls = message.get("tool_calls")
                    if offered and calls and any(tools.is_device_call(call) for call in calls):
                        event, line = "tool_calls", _only_device_calls(chunk, line, tools)
                if chunk.get("done") is True:
                    reply.done = True
                    control.settle()  # the round is said: a stop now lands after it
                    metrics.model_speed(
                        request.model, chunk.get("eval_count"), chunk.get("eval_duration")
                    )
                    if truncated := _truncated_by_ollama(chunk, fitted.tokens, window):
                        notices.append(
                            (None, "context", empty_line(request.model, trimmed=truncated))
                        )
                elif not relayed and not continuing:
                    metrics.first_token(
                        request.route, asyncio.get_running_loop().time() - request.received
                    )
                if not reply.done:
                    relayed += 1
                for notice in notices:
                    if held:
                        held.append(notice)
                    else:
                        outbox.send(notice[1], notice[2])
                notices = []
                if event or held:
                    held.append((None, event, line))
                else:
                    outbox.send(None, line)
        finally:
            metrics.reply_tokens(request.model, relayed)
            await generation.aclose()
        if not reply.done:
            raise StreamError("Ollama's stream ended before its last (done) line")
        return held


def error_kind(exc: Exception) -> str:
    """The `kind` label of chatterd_errors_total for a failure reported to a client."""
    if isinstance(exc, Shed):
        return "queue_full" if exc.status == 503 else "client_queue_full"
    if isinstance(exc, NoServer):
        return "model_not_found" if exc.status == 404 else "no_server"
    if isinstance(exc, OllamaError):
        return "ollama_unreachable" if exc.unreachable else "ollama_refused"
    if isinstance(exc, StreamError):
        return "ollama_stream"
    return "database"


def _trimmed(fitted: budget.Fitted, limit: Budget) -> dict[str, Any]:
    return {
        "by": "chatterd",
        "omitted_messages": fitted.omitted,
        "sent_messages": len(fitted.messages),
        "estimated_tokens": fitted.tokens,
        "max_messages": limit.max_messages,
        "max_tokens": limit.max_tokens,
    }


def _truncated_by_ollama(
    done: dict[str, Any], estimated: int, window: int
) -> dict[str, Any] | None:
    """What Ollama cut, when the prompt was over the context window and it evaluated less.

    Ollama cuts such a prompt from the front without a word; `prompt_eval_count` only says
    how much it evaluated (less again when it reused a cached prefix), so chatterd speaks up
    only when its own estimate of the prompt is over the window.
    """
    evaluated = done.get("prompt_eval_count")
    if not isinstance(evaluated, int) or estimated <= window or evaluated > window:
        return None
    return {
        "by": "ollama",
        "prompt_eval_count": evaluated,
        "num_ctx": window,
        "estimated_tokens": estimated,
    }


def _only_device_calls(chunk: dict[str, Any], line: bytes, tools: ToolUse) -> bytes:
    """The line as Ollama sent it, or, when it also calls resident tools, without those calls."""
    calls = chunk["message"]["tool_calls"]
    device_calls = [call for call in calls if tools.is_device_call(call)]
    if len(device_calls) == len(calls):
        return line
    message = {**chunk["message"], "tool_calls": device_calls}
    compact = json.dumps({**chunk, "message": message}, separators=(",", ":"))
    return compact.encode()
