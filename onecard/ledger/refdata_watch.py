"""Reference data changed in the database reaches every running process.

Each process keeps a copy of the reference data (refdata.py) and re-read it
only for an id it did not know. A change to a row it knew went unseen until
restart: a terminal moved to another operator kept crediting the old
operator's payable, a product's new limits were not applied. Migration 0017
makes every change to those tables notify channel ``onecard_refdata`` at its
COMMIT; each process listens on a connection of its own (the pooled ones keep
no session state, see LedgerConnection) and re-reads its copy when told.

A notification sent while the listening connection was down is lost, so the
watcher re-reads after every (re)connection, and it reconnects by itself
when the database comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from onecard.ledger.refdata import ReferenceData

log = logging.getLogger(__name__)

#: The channel migration 0017's triggers notify.
CHANNEL = "onecard_refdata"


class RefdataWatch:
    """Listens for reference data changes and re-reads the process's copy.

    ``connect`` opens the listening connection; ``pool`` lends the
    connection each re-read runs on, so a slow re-read never holds up the
    listener. Several notifications that arrive during one re-read lead to
    one more re-read after it, not one each.
    """

    def __init__(
        self,
        ref: ReferenceData,
        pool: asyncpg.Pool,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        *,
        retry_s: float = 1.0,
        max_retry_s: float = 30.0,
    ) -> None:
        self._ref = ref
        self._pool = pool
        self._connect = connect
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._changed = asyncio.Event()
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Completed re-reads, and the database backend listening (operations
        #: and tests find the watch's session by it).
        self.refreshes = 0
        self.listening_pid: int | None = None

    async def start(self) -> None:
        """Listen before returning, so that a change committed from now on is seen."""
        conn = await self._listen()
        self._task = asyncio.create_task(self._run(conn), name="refdata-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _listen(self) -> asyncpg.Connection:
        conn = await self._connect()
        try:
            await conn.add_listener(CHANNEL, self._notified)
        except BaseException:
            await conn.close()
            raise
        conn.add_termination_listener(self._terminated)
        self._lost.clear()
        self.listening_pid = conn.get_server_pid()
        return conn

    def _notified(self, *_: object) -> None:
        self._changed.set()

    def _terminated(self, *_: object) -> None:
        self._lost.set()

    async def _run(self, conn: asyncpg.Connection | None) -> None:
        delay = self._retry_s
        # A change committed between the copy's first read and LISTEN was not
        # notified to this connection: read once now.
        self._changed.set()
        try:
            while True:
                if conn is None or conn.is_closed():
                    try:
                        conn = await self._listen()
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                        log.warning(
                            "reference data watch: database unavailable (%s); retrying in %gs",
                            type(exc).__name__,
                            delay,
                        )
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, self._max_retry_s)
                        continue
                    delay = self._retry_s
                    self._changed.set()  # what was notified while it was down is lost
                await self._wait_for_change_or_loss()
                if self._lost.is_set():
                    conn = None
                    continue
                self._changed.clear()
                try:
                    async with self._pool.acquire() as reading:
                        await self._ref.refresh(reading)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning(
                        "reference data watch: re-read failed (%s); trying again",
                        type(exc).__name__,
                    )
                    self._changed.set()
                    await asyncio.sleep(delay)
                    continue
                self.refreshes += 1
        finally:
            if conn is not None and not conn.is_closed():
                await conn.close()

    async def _wait_for_change_or_loss(self) -> None:
        if self._changed.is_set() or self._lost.is_set():
            return
        waits = [
            asyncio.ensure_future(self._changed.wait()),
            asyncio.ensure_future(self._lost.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
