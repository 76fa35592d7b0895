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
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Overloaded(Exception):
    """The queue is at its limit; the caller should back off and retry."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"queue is full ({limit} requests waiting); retry later")
        self.limit = limit


class GroupCommitter(Generic[T, R]):
    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 1000,
        max_queue: int = 10_000,
        linger: float = 0.0,
    ) -> None:
        self._flush = flush
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.linger = linger
        self._queue: collections.deque[tuple[T, asyncio.Future[R]]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0
        self.items = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="group-commit")

    def __len__(self) -> int:
        return len(self._queue)

    async def submit(self, item: T) -> R:
        if self._closing:
            raise Overloaded(0)
        if len(self._queue) >= self.max_queue:
            raise Overloaded(self.max_queue)
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        self._wakeup.set()
        return await fut

    async def close(self) -> None:
        """Stop taking requests, finish every queued one, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.linger and len(self._queue) < self.max_batch and not self._closing:
                await asyncio.sleep(self.linger)
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            items = [item for item, _ in batch]
            try:
                results = await self._flush(items)
            except Exception as exc:  # the whole batch failed: every caller sees why
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(batch)
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)
