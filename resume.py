"""Resumed streams: following a reply's events in the event log, from any worker.

A worker reads each reply it has followers for once per notice of new events, whatever
the number of followers, and hands what it read to all of them (a `Feed`). It wakes when
the bus says the reply's appID has new events, never by polling; and once a second, in one query for
all its feeds, it checks that the replies they follow still run, so that a reply whose
host died ends with an error event (it has no END and never will).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from bus import Bus
from database import StoreError
from events import END, EventLog, LoggedEvent

LIVENESS_SECONDS = 1.0  # how often a worker checks that the replies it follows still run
CUT_OFF = (
    b'{"error":"the reply was cut off before its end (its host stopped, or lost the'
    b' database); GET /conversations/{appID} shows what was stored"}'
)


class Feed:
    """One reply's events after `start`, as this worker reads them for its followers."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.events: list[LoggedEvent] = []
        self.ended = False  # its END was read, or it was cut off
        self.failure: StoreError | None = None
        self.followers = 0
        self.woken = asyncio.Event()  # set by the bus and by the liveness check: read again
        self._grown = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None

    def add(self, events: list[LoggedEvent]) -> None:
        self.events.extend(events)
        self._grow()

    def end(self, last: LoggedEvent | None = None, failure: StoreError | None = None) -> None:
        if last is not None:
            self.events.append(last)
        self.ended, self.failure = True, failure
        self._grow()

    async def grown(self, seen: int) -> None:
        """Until there are more than `seen` events, or the feed has ended."""
        while len(self.events) <= seen and not self.ended:
            await self._grown.wait()

    def _grow(self) -> None:
        self._grown.set()
        self._grown = asyncio.Event()


class Followers:
    def __init__(self, log: EventLog, messages: Bus) -> None:
        self._log = log
        self._bus = messages
        self._feeds: dict[tuple[str, int], Feed] = {}

    async def follow(
        self, app_id: str, reply: int, after: int, read: list[LoggedEvent]
    ) -> AsyncIterator[list[LoggedEvent]]:
        """The reply's events after `after`, in batches as they are logged, until its end.

        `read` is what the caller has already read after `after`. A reply that was cut off
        (its turn's lease is gone and it has no END) ends with an error event, whose id is
        one past the last: a client that reconnects with it has seen everything.
        """
        if read:
            sendable = [event for event in read if event.event != END]
            if sendable:
                yield sendable
            if len(sendable) < len(read):
                return
            after = read[-1].id
        feed = self._join(app_id, reply, after)
        try:
            if after < feed.start:  # this follower is further behind than the feed began
                behind = await self._log.read(app_id, reply, after, upto=feed.start)
                if behind:
                    yield behind
                after = feed.start
            seen = 0
            while True:
                await feed.grown(seen)
                if feed.failure is not None:
                    raise feed.failure
                batch = [event for event in feed.events[seen:] if event.id > after]
                seen = len(feed.events)
                sendable = [event for event in batch if event.event != END]
                if sendable:
                    yield sendable
                if feed.ended and seen == len(feed.events):
                    return
        finally:
            self._leave(app_id, reply, feed)

    def _join(self, app_id: str, reply: int, after: int) -> Feed:
        feed = self._feeds.get((app_id, reply))
        if feed is None:
            feed = self._feeds[(app_id, reply)] = Feed(after)
            feed.reader = asyncio.create_task(self._read(app_id, reply, feed))
        feed.followers += 1
        return feed

    def _leave(self, app_id: str, reply: int, feed: Feed) -> None:
        feed.followers -= 1
        if feed.followers == 0:
            if self._feeds.get((app_id, reply)) is feed:
                del self._feeds[(app_id, reply)]
            if feed.reader is not None:
                feed.reader.cancel()

    async def _read(self, app_id: str, reply: int, feed: Feed) -> None:
        """Read the reply's new events each time the feed is woken, until its end."""
        last = feed.start
        with self._bus.watch("events", app_id) as woken:
            feed.woken = woken
            try:
                while True:
                    woken.clear()  # before reading: a message that comes meanwhile wakes us
                    new = await self._log.read(app_id, reply, last)
                    if not new and not await self._log.live(app_id, reply):
                        new = await self._log.read(app_id, reply, last)  # it may have just ended
                        if not new:
                            feed.end(LoggedEvent(last + 1, "error", CUT_OFF))
                            break
                    if new:
                        feed.add(new)
                        last = new[-1].id
                        if new[-1].event == END:
                            feed.end()
                            break
                    await woken.wait()  # for the next notice (or the liveness check)
            except StoreError as exc:
                feed.end(failure=exc)
        if self._feeds.get((app_id, reply)) is feed:
            del self._feeds[(app_id, reply)]  # later followers read the log afresh

    async def watch_liveness(self) -> None:
        """Once a second, wake the feeds of replies whose turn no longer runs (its host died,
        say), so that they end: one query for all of this worker's feeds."""
        while True:
            await asyncio.sleep(LIVENESS_SECONDS)
            if not self._feeds:
                continue
            with contextlib.suppress(StoreError):
                for key in await self._log.not_running(list(self._feeds)):
                    if feed := self._feeds.get(key):
                        feed.woken.set()
