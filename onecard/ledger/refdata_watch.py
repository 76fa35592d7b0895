"""Reference data changed in the database reaches every running process.

Each process keeps a copy of the reference data (refdata.py) and re-read it
only for an id it did not know. A change to a row it knew went unseen until
restart: a terminal moved to another operator kept crediting the old
operator's payable, a product's new limits were not applied. Migration 0017
makes every change to those tables notify channel ``onecard_refdata`` at its
COMMIT; each process listens on a connection of its own (the pooled ones keep
no session state, see LedgerConnection) and re-reads its copy when told.
Terminals, the one table that is large and changes every day, are named in
the notification (migration 0019) and re-read alone; any other change, or
a statement that changed more terminals than a notification names, re-reads
the whole copy.

A notification sent while the listening connection was down is lost, so the
watch re-reads after every (re)connection. A connection can also die without
a word (a network partition, a NAT that dropped an idle flow): after
``probe_s`` without a notification the watch asks it a ``SELECT 1``, and one
that does not answer is dropped and replaced.
"""

from __future__ import annotations

import asyncio
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
    connection each re-read runs on. A burst of changes (a script
    registering terminals one by one) is one re-read: the watch waits
    ``settle_s`` after a notification for the rest of the burst, and
    notifications that arrive during a re-read lead to one more after it.
    """

    def __init__(
        self,
        ref: ReferenceData,
        pool: asyncpg.Pool,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        *,
        retry_s: float = 1.0,
        max_retry_s: float = 10.0,
        probe_s: float = 30.0,
        settle_s: float = 0.2,
    ) -> None:
        self._ref = ref
        self._pool = pool
        self._connect = connect
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        #: Seconds without a notification after which the connection is probed.
        self.probe_s = probe_s
        self.settle_s = settle_s
        self._changed = asyncio.Event()
        #: What the notifications since the last re-read named: terminals by
        #: id, or anything else, which needs the whole copy read again.
        self._terminals: set[int] = set()
        self._whole = True
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Completed re-reads, and the database backend listening, None while
        #: none is (operations and tests find the watch's session by it).
        self.refreshes = 0
        self.listening_pid: int | None = None

    async def start(self) -> None:
        """Listen before returning, so that a change committed from now on is seen."""
        conn = await self._listen()
        self._task = asyncio.create_task(self._run(conn), name="refdata-watch")

    async def close(self) -> None:
        """Stop; never raises, so that the ledger's own shutdown goes on after it."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("reference data watch: ended with an error")

    async def _listen(self) -> asyncpg.Connection:
        conn = await self._connect()
        try:
            await conn.add_listener(CHANNEL, self._notified)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._terminated)
        self._lost.clear()
        self.listening_pid = conn.get_server_pid()
        return conn

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        table, _, ids = str(payload).partition(":")
        if table == "terminals" and ids:
            try:
                self._terminals.update(int(i) for i in ids.split(","))
            except ValueError:
                self._whole = True
        else:
            self._whole = True
        self._changed.set()

    def _lose_track(self) -> None:
        """Whatever was notified while nobody listened is unknown: read everything."""
        self._whole = True
        self._changed.set()

    def _terminated(self, *_: object) -> None:
        self._lost.set()
        self.listening_pid = None

    async def _run(self, conn: asyncpg.Connection | None) -> None:
        delay = self.retry_s
        # A change committed between the copy's first read and LISTEN was not
        # notified to this connection: read once now.
        self._lose_track()
        try:
            while True:
                try:
                    if conn is None:
                        conn = await self._listen()
                        self._lose_track()  # what was notified while it was down is lost
                    await self._until_changed(conn)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # The listening connection is gone or does not answer:
                    # drop it (no goodbye: it may never answer one) and
                    # connect again, with a growing pause while that fails.
                    log.warning(
                        "reference data watch: listening connection lost (%s); reconnecting in %gs",
                        type(exc).__name__,
                        delay,
                    )
                    if conn is not None:
                        self._drop(conn)
                        conn = None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_retry_s)
                    continue
                self._changed.clear()
                whole, terminals = self._whole, self._terminals
                self._whole, self._terminals = False, set()
                try:
                    async with self._pool.acquire() as reading:
                        if whole:
                            await self._ref.refresh(reading)
                        else:
                            await self._ref.refresh_terminals(reading, terminals)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # The next round reads again; an error nobody foresaw is
                    # logged whole, and the watch goes on.
                    if isinstance(exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError):
                        log.warning(
                            "reference data watch: re-read failed (%s); again in %gs",
                            type(exc).__name__,
                            delay,
                        )
                    else:
                        log.exception("reference data watch: re-read failed; again in %gs", delay)
                    self._whole |= whole
                    self._terminals |= terminals
                    self._changed.set()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_retry_s)
                    continue
                self.refreshes += 1
                delay = self.retry_s
        finally:
            if conn is not None:
                self._drop(conn)

    def _drop(self, conn: asyncpg.Connection) -> None:
        """Close without a goodbye (a dead peer never answers one), and without the
        closing itself being taken for the loss of the next connection."""
        conn.remove_termination_listener(self._terminated)
        conn.terminate()
        self.listening_pid = None

    async def _until_changed(self, conn: asyncpg.Connection) -> None:
        """Return once a change was notified (and its burst has settled); raise if ``conn`` died."""
        while not self._changed.is_set():
            if self._lost.is_set() or conn.is_closed():
                raise ConnectionResetError("listening connection closed")
            waits = [
                asyncio.ensure_future(self._changed.wait()),
                asyncio.ensure_future(self._lost.wait()),
            ]
            try:
                done, _ = await asyncio.wait(
                    waits, timeout=self.probe_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for w in waits:
                    w.cancel()
            if not done:  # quiet for a while: is anyone still there?
                await conn.fetchval("SELECT 1", timeout=min(self.probe_s, 5.0))
        if self._lost.is_set():
            raise ConnectionResetError("listening connection closed")
        await asyncio.sleep(self.settle_s)
