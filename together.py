"""Many turns' requests of one kind, sent to the database in one statement.

At a few hundred turns a second, each turn's own statement would queue behind the others'
(for seconds, measured at 500 streams, on the leases' one lock connection), or wait for
one of the pool's few connections. Here a request that comes while a statement is under
way waits for the next one, which carries every request that came meanwhile: one round
trip, however many turns start or end together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from database import StoreError

# A request: the appID it is for, and what it carries (the rows to store, say), if anything.
Asked = list[tuple[str, Any]]


class Together:
    """Requests keyed by appID, sent together: one statement under way at a time."""

    def __init__(
        self,
        send: Callable[[Asked], Awaitable[dict[str, Any]]],
        abandoned: Callable[[str, Any], None] = lambda app_id, answer: None,
    ) -> None:
        # The statement: requests in, an answer per appID (None if absent; an exception
        # is raised to that appID's asker alone).
        self._send = send
        self._abandoned = abandoned  # an answer whose asker was cancelled meanwhile
        self._waiting: list[tuple[str, Any, asyncio.Future[Any]]] = []
        self._sending: asyncio.Task[None] | None = None

    async def ask(self, app_id: str, carrying: Any = None) -> Any:
        """The answer of the next statement for this appID. Cancelled before that statement
        goes out, it is left out of it; cancelled later, its answer goes to `abandoned`."""
        answer = self._enqueue(app_id, carrying)
        try:
            return await answer
        except asyncio.CancelledError:
            if answer.done() and not answer.cancelled() and answer.exception() is None:
                self._abandoned(app_id, answer.result())  # answered as it was cancelled
            raise

    def tell(self, app_id: str) -> None:
        """Have the appID in the next statement, without waiting for it."""
        self._enqueue(app_id, None).add_done_callback(_ignore)

    def _enqueue(self, app_id: str, carrying: Any) -> asyncio.Future[Any]:
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append((app_id, carrying, answer))
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send_waiting())
        return answer

    async def _send_waiting(self) -> None:
        batch: list[tuple[str, Any, asyncio.Future[Any]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                batch = [asked for asked in batch if not asked[2].done()]
                if not batch:
                    continue  # each asker was cancelled meanwhile
                try:
                    answers = await self._send([(app_id, carried) for app_id, carried, _ in batch])
                except Exception as exc:  # StoreError; anything else is a bug, told as it is
                    for _, _, answer in batch:
                        if not answer.done():  # each its own StoreError, for its traceback
                            answer.set_exception(_own(exc))
                else:
                    for app_id, _, answer in batch:
                        told = answers.get(app_id)
                        if isinstance(told, Exception):  # this request's own failure
                            if not answer.done():
                                answer.set_exception(told)
                        elif answer.done():
                            self._abandoned(app_id, told)
                        else:
                            answer.set_result(told)
                batch = []
        finally:
            self._sending = None
            for _, _, answer in [*batch, *self._waiting]:  # cancelled itself: shutting down
                answer.cancel()
            self._waiting = []


def _own(exc: Exception) -> Exception:
    if not isinstance(exc, StoreError):
        return exc
    own = StoreError(str(exc))
    own.__cause__ = exc.__cause__
    return own


def _ignore(answer: asyncio.Future[Any]) -> None:
    if not answer.cancelled():
        answer.exception()  # retrieved: nobody waits for it
