"""The chat pipeline shared by /llmchat and /llmtools.

A request flows one way: its messages are stored and the newest history read back; the
history goes to Ollama; each line Ollama streams is relayed to the client as it arrives;
the reply is stored; tool calls, on /llmtools, are run (resident tools) or forwarded to
the app (device tools), and the model is asked again, up to a bound on rounds.

The pipeline runs as a task of its own that writes events to an Outbox, which the HTTP
response reads. A client that goes away therefore stops nothing: the reply is still
completed and stored, so the next request sees a whole history.

Every event the pipeline sends is also appended to the event log (events.py) under an id,
so a client that lost its stream can resume it. Only the newest part of a long history
goes to the model, within the context budget (budget.py); the client is told when
messages were left out, by chatterd or by Ollama.

A turn is all or nothing: when it fails (Ollama refuses or breaks off, a line is not JSON,
the database refuses the reply, the round limit is reached), the rows it wrote are
removed again, so the stored conversation is as it was before the request. Turns of one
appID run one at a time, across all workers, under a lease kept in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import budget
import metrics
import toolbox
from admission import Admission, Shed
from budget import Budget
from bus import Bus
from events import END, EventLog, first_id
from history import History, StoreError, Turn
from leases import ConversationBusy, Leases
from ollama import Message, OllamaError, Reply, empty_line, function_name
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


# An SSE event: its id (None before the turn has one), its name (None: a plain data event)
# and its data, one line of JSON.
Event = tuple[int | None, str | None, bytes]
PING = "ping"  # in an Outbox's queue: the response should send a keep-alive comment


@dataclass
class Refusal:
    """A failure before any event was sent: the client gets this status and JSON error."""

    status: int
    error: str
    retry_after: int | None = None  # seconds, for a Retry-After header


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
        self.pressed = False
        self.failure: Exception | None = None  # why the turn can't go on (its lease is lost)
        self.ended = asyncio.Event()
        self._current: asyncio.Task[Any] | None = None

    def press(self) -> None:
        self.pressed = True
        if self._current is not None:
            self._current.cancel()

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


class Outbox:
    """The events of one response: written by the pipeline, read by the HTTP response.

    Once the turn has its reply number (`begin`), each event also goes to the event log.
    """

    def __init__(self, app_id: str, event_log: EventLog) -> None:
        self._queue: asyncio.Queue[Refusal | Event | str | None] = asyncio.Queue()
        self._app_id = app_id
        self._log = event_log
        self._next_id: int | None = None
        self.started = False
        self.failed = False

    # The pipeline's side.
    def begin(self, reply: int) -> None:
        self._next_id = first_id(reply)

    def send(self, event: str | None, data: bytes) -> None:
        self.started = True
        self._queue.put_nowait((self._log_event(event, data), event, data))

    def fail(self, status: int, error: str, retry_after: int | None = None) -> None:
        """Report a failure: as an HTTP status while nothing was sent, else as an error event."""
        if self.failed:
            return
        self.failed = True
        data = json.dumps({"error": error}, ensure_ascii=False).encode()
        if self.started:
            self.send("error", data)
        else:
            self._log_event("error", data)  # a resumed stream hears of it too
            self._queue.put_nowait(Refusal(status, error, retry_after))

    def end(self) -> None:
        """Mark the end of the reply in the log; later events go to this response only."""
        self._log_event(END, b"")
        self._next_id = None

    def close(self) -> None:
        self._queue.put_nowait(None)

    def _log_event(self, event: str | None, data: bytes) -> int | None:
        event_id = self._next_id
        if event_id is not None:
            self._next_id = event_id + 1
            self._log.append(self._app_id, event_id, event, data)
        return event_id

    # The response's side.
    async def first(self) -> Refusal | Event | None:
        return await self._queue.get()

    def ping(self) -> None:
        """Ask the response for a keep-alive comment: it comes as an empty batch."""
        self._queue.put_nowait(PING)

    async def rest(self) -> AsyncIterator[list[Event]]:
        """The remaining events, in batches: all that are waiting, each time it wakes.
        An empty batch is a ping."""
        while True:
            item = await self._queue.get()
            batch: list[Event] = []
            pinged = item is PING
            while isinstance(item, tuple) or item is PING:  # a Refusal can only come first
                if item is not PING:
                    batch.append(item)
                if self._queue.empty():
                    break
                item = self._queue.get_nowait()
                pinged = pinged or item is PING
            if batch or pinged:
                yield batch
            if item is None:
                return


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
        """Another worker asks for a stop: press the button if the turn runs here."""
        if control := self._turns.get(app_id):
            control.press()

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
                outbox.begin(reply)
                self._turns[request.app_id] = control
                try:
                    await self._turn(request, outbox, control)
                except asyncio.CancelledError:
                    outbox.fail(503, SHUTTING_DOWN)
                    raise
                finally:
                    del self._turns[request.app_id]
                    outbox.end()
                    # Resumed streams must find the END before the lease goes.
                    await asyncio.shield(self.event_log.flush())
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
        """One turn, all or nothing: on failure the rows it wrote are removed again."""
        stored: list[int] = []  # grows as the turn writes rows; _converse appends to it
        try:
            turn = await self.history.record(
                request.app_id,
                request.messages,
                request.declared_tools,
                window=self.limits.history_messages,
                with_tools=request.with_tools,
            )
            stored = turn.stored
            await self._converse(request, turn, outbox, control)
        except (OllamaError, StoreError, StreamError, NoServer, Shed) as exc:
            await self._undo(request.app_id, stored)
            metrics.error(error_kind(exc))
            outbox.fail(exc.status, str(exc), getattr(exc, "retry_after", None))
        except BaseException:
            await asyncio.shield(self._undo(request.app_id, stored))
            raise

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
        messages, new, stored = turn.history, turn.new, turn.stored
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
                        continuing=round_number > 0,
                    )
                )
            except Stopped:
                if round_number == 0 and not reply.began:  # it never reached Ollama
                    await self._undo(request.app_id, stored)
                    self._end_stopped(request, outbox, "waiting")
                    return
                rows = [(reply.spoken(), reply.thinking)] if reply.began else []
                await self._complete(request, control, rows, stored)
                self._end_stopped(request, outbox, "running")
                return
            if reply.tool_calls and not offered:  # called anyway: nothing is run
                tools.tell_ignored_calls(reply.tool_calls)
                await self._complete(request, control, [(reply.spoken(), reply.thinking)], stored)
                return
            if not reply.tool_calls:
                if round_number and not reply.content.strip():
                    tools.tell_empty_reply(round_number)
                await self._complete(
                    request, control, [(reply.as_message(), reply.thinking)], stored
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
                await self._complete(request, control, rows, stored)
                self._end_stopped(request, outbox, "running")
                return
            rows = [(call, reply.thinking), *((result, None) for result in results)]
            if held:
                # Device calls: the app runs them and posts the results as a new request,
                # which must find the call stored; so the events go out only now.
                await self._complete(request, control, rows, stored)
                for _, event, data in held:
                    outbox.send(event, data)
                return
            metrics.tool_round()
            control.check()
            stored += await self.history.append(request.app_id, rows)
            messages = [*messages, call, *results]
            new += 1 + len(results)

    async def _complete(
        self,
        request: ChatRequest,
        control: TurnControl,
        rows: list[tuple[Message, str | None]],
        stored: list[int],
    ) -> None:
        """Store the turn's last rows and make the whole turn part of the conversation."""
        control.check()  # a turn that lost its lease must not store
        await self.history.complete(request.app_id, rows, stored)

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
                    chunk = json.loads(line)
                except ValueError:
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

    async def _undo(self, app_id: str, stored: list[int]) -> None:
        try:
            await self.history.remove(app_id, stored)
        except StoreError as exc:
            log.error("could not undo a failed turn for an app: %s", exc)


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
