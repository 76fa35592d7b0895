"""Group commit: many concurrent requests, one database transaction.

Requests wait in a bounded queue. A single flusher takes everything queued
(up to ``max_batch``) as soon as the previous batch has committed, so under
light load a request waits for nothing and under heavy load batches grow by
themselves. A full queue refuses at once rather than letting latency grow
without bound.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class Overloaded(Exception):
    """The queue is at its limit; the caller should back off and retry.

    ``committer`` names the queue, so the server can name the setting that
    bounds it (the ledger knows no flags).
    """

    def __init__(self, limit: int, committer: str = "") -> None:
        super().__init__(
            f"{committer + ' ' if committer else ''}queue is full ({limit} requests waiting); "
            "retry later"
        )
        self.limit = limit
        self.committer = committer


class ItemsHeld(Exception):
    """Some items of a batch cannot be written now; the others can go without them.

    Raised by a flush: a card whose row another session holds past the lock
    timeout failed every caller of the batch it landed in, and every batch
    after it while the terminals resent, so one stuck row stopped a whole
    process's debits. The committer fails only the groups with an item
    ``holds`` matches and flushes the rest again at once.
    """

    def holds(self, item: Any) -> bool:
        raise NotImplementedError


class ShuttingDown(Exception):
    """The committer is closing: the caller should retry against another server.

    Not Overloaded: a queue that is merely full asks for backing off, a server
    going away asks for going elsewhere, and the two map to different statuses.
    """

    def __init__(self) -> None:
        super().__init__("server is shutting down; retry (another server takes the call)")


class GroupCommitter(Generic[T, R]):
    """Merges concurrent submissions into batches, one flush (transaction) each.

    A submission is a group of items (one online request, or a whole upload
    batch of a gateway); a group is never split across flushes, so an upload
    batch commits or fails as a whole. The queue bound counts items.
    """

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 1000,
        max_queue: int = 10_000,
        linger: float = 0.0,
        name: str = "group-commit",
        flushers: int = 1,
        on_flush: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self._flush = flush
        #: Told (name, items, seconds) after each committed flush: the server's
        #: metrics, without the ledger knowing about them.
        self._on_flush = on_flush
        self.flushers = flushers
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.linger = linger
        self.name = name
        self._queue: collections.deque[tuple[list[T], asyncio.Future[list[R]]]] = (
            collections.deque()
        )
        self._queued_items = 0
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        #: Given up on (``abandon``): a flush that fails from now on tells its
        #: callers ShuttingDown, not the error of a connection taken from it.
        self._abandoned = False
        #: Callers whose items are in a flush now (in a transaction, not queued).
        self._flushing_callers = 0
        self.batches = 0
        self.items = 0

    def start(self) -> None:
        """Start the flushers; with more than one, batches overlap their COMMITs.

        Two transactions in flight keep the database busy while the other
        waits for its WAL flush; correctness does not depend on it (cards
        are locked in one order, and a (terminal, seq) raced by a concurrent
        batch is answered as a duplicate on the retry).
        """
        loop = asyncio.get_running_loop()
        while len(self._tasks) < self.flushers:
            self._tasks.append(loop.create_task(self._run(), name=self.name))

    def __len__(self) -> int:
        return self._queued_items

    async def submit(self, item: T) -> R:
        return (await self.submit_many([item]))[0]

    def check_room(self, count: int) -> None:
        """Raise Overloaded now if ``count`` more items would be refused.

        For a caller with work to do before it can submit (an upload batch's
        MAC checks and fingerprints): asking first makes a refusal cost next
        to nothing, and under overload refusals are most of the traffic. An
        empty queue takes any group, however large.
        """
        if self._closing:
            raise ShuttingDown()
        if self._queued_items + count > self.max_queue and self._queued_items:
            raise Overloaded(self.max_queue, self.name)

    async def submit_many(self, items: list[T]) -> list[R]:
        """Results for ``items`` in order, after the transaction holding them committed."""
        if not items:
            return []
        self.check_room(len(items))
        fut: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self._queue.append((items, fut))
        self._queued_items += len(items)
        self._wakeup.set()
        return await fut

    async def close(self) -> None:
        """Stop taking requests, finish every queued one, then stop."""
        self._closing = True
        self._wakeup.set()
        tasks, self._tasks = self._tasks, []
        await asyncio.gather(*tasks)

    def abandon(self) -> tuple[int, int]:
        """Give up on what ``close`` has not finished: (callers queued, callers in a flush).

        For a stop that cannot wait for the database any longer (one that does
        not answer: a partition, a paused VM, a storage stall). Each queued
        caller is told ShuttingDown now, nothing of its request sent. A flush
        in flight is left to fail (the caller terminates its connection): its
        callers are told ShuttingDown too, whatever the error, since only a
        COMMIT that returned is ever answered with results. Either way the
        caller retries elsewhere, and the retry of a request that did commit
        is answered as the duplicate it is.
        """
        self._closing = True
        self._abandoned = True
        queued = 0
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(ShuttingDown())
                queued += 1
        self._queued_items = 0
        self._wakeup.set()
        return queued, self._flushing_callers

    def _take_batch(self) -> list[tuple[list[T], asyncio.Future[list[R]]]]:
        """The next batch; groups whose caller has gone are dropped, not flushed.

        A caller whose deadline passed while it waited (or that hung up) was
        cancelled, and its future with it: it was told nothing was done, and
        its retry will be taken as new. Committing its work anyway spent the
        database on replies nobody reads, most of all under the overload that
        made callers time out.
        """
        groups: list[tuple[list[T], asyncio.Future[list[R]]]] = []
        size = 0
        while self._queue and (not groups or size + len(self._queue[0][0]) <= self.max_batch):
            group = self._queue.popleft()
            self._queued_items -= len(group[0])
            if group[1].done():
                continue
            groups.append(group)
            size += len(group[0])
        return groups

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    self._wakeup.set()  # let the other flushers see it too
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.linger and self._queued_items < self.max_batch and not self._closing:
                await asyncio.sleep(self.linger)
                if not self._queue:
                    continue  # another flusher took it
            groups = self._take_batch()
            if not groups:
                continue  # every caller queued had gone
            items = [item for group, _ in groups for item in group]
            began = time.perf_counter()
            self._flushing_callers += len(groups)
            try:
                results = await self._flush(items)
            except asyncio.CancelledError:
                # Stopped without waiting for this flush: whether it committed
                # is unknown, so no caller is told it did.
                _fail(groups, ShuttingDown())
                raise
            except ItemsHeld as exc:
                if self._abandoned:
                    _fail(groups, ShuttingDown())
                    continue
                held = [any(exc.holds(i) for i in group) for group, _ in groups]
                for (_, fut), fails in zip(groups, held, strict=True):
                    # If it named nothing of this batch, the whole batch fails.
                    if (fails or not any(held)) and not fut.done():
                        fut.set_exception(exc)
                if any(held):
                    # The others go first in the next flush, in their order.
                    for (group, fut), fails in reversed(list(zip(groups, held, strict=True))):
                        if not fails:
                            self._queue.appendleft((group, fut))
                            self._queued_items += len(group)
                continue
            except Exception as exc:  # the whole batch failed: every caller sees why
                _fail(groups, ShuttingDown() if self._abandoned else exc)
                continue
            finally:
                self._flushing_callers -= len(groups)
            took = time.perf_counter() - began
            # Committed: answer every caller before anything else can fail.
            start = 0
            for group, fut in groups:
                end = start + len(group)
                if not fut.done():
                    fut.set_result(list(results[start:end]))
                start = end
            self.batches += 1
            self.items += len(items)
            if self._on_flush is not None:
                try:
                    self._on_flush(self.name, len(items), took)
                except Exception:
                    # A metrics write that fails (a full disk under the
                    # multiprocess files) must not end the only flusher: every
                    # later caller would wait until the queue refused them all.
                    log.exception("%s: recording a flush failed; flushing goes on", self.name)
            log.debug(
                "%s: %d items in %.1f ms, %d queued",
                self.name,
                len(items),
                took * 1e3,
                self._queued_items,
            )


def _fail(groups: list[tuple[list[Any], asyncio.Future[Any]]], exc: Exception) -> None:
    """Tell each caller of ``groups`` still waiting ``exc``."""
    for _, fut in groups:
        if not fut.done():
            fut.set_exception(exc)
