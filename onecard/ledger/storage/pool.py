"""The ledger's connection pool: what every session is set up with, and what it skips.

Kept apart from the server so that tools and benchmarks open the same kind
of pool the server does.
"""

from __future__ import annotations

from typing import Any

import asyncpg

#: Set on every ledger session, whatever the database's own defaults.
#: PostgreSQL's default random_page_cost (4, for spinning disks) made the
#: planner update a batch's cards through a hash join over a seq scan of the
#: whole cards table: 7.3 us a card at 100,000 cards, against 4.9 us through
#: the primary key (4,000-card batches, same run). A ledger's working set is
#: in memory or on SSD, where 1.1 is the usual figure.
SESSION_SETTINGS = {"random_page_cost": "1.1"}

#: The server settings without which a COMMIT that returned can be lost or
#: corrupted in a crash; a session cannot change them, so the ledger refuses
#: the database instead of acknowledging what it may lose.
_SERVER_DURABILITY = ("fsync", "full_page_writes")


class NotDurable(Exception):
    """The database would acknowledge a COMMIT that a crash could lose.

    A start-up refusal (the DBA's to fix), raised before any request is taken.
    """


async def _durable_session(conn: asyncpg.Connection) -> None:
    """Make sure this session's COMMIT returns only once its WAL is on disk.

    With --dsn the sessions took whatever the database, role or DSN set, and a
    database tuned with ``synchronous_commit = off`` acknowledged debits and
    loads (a MAC2 the chip then credited) that a crash could take back (found
    by review). Turned on for the session only when off: ``local``,
    ``remote_write`` and ``remote_apply`` are durable here, and the stronger
    ones wait for a standby too, so they are left as the DBA set them. One
    round trip when a connection opens, none per flush.
    """
    row = await conn.fetchrow(
        "SELECT current_setting('fsync') AS fsync, "
        "current_setting('full_page_writes') AS full_page_writes, "
        "current_setting('synchronous_commit') AS synchronous_commit"
    )
    assert row is not None
    off = [name for name in _SERVER_DURABILITY if row[name] != "on"]
    if off:
        raise NotDurable(
            f"the database runs with {' and '.join(f'{n} = off' for n in off)}: a crash could "
            "lose or corrupt transactions it had confirmed; the ledger acknowledges only "
            "durable writes, so turn it on (postgresql.conf) and start again"
        )
    if row["synchronous_commit"] == "off":
        await conn.execute("SET synchronous_commit = on")


class LedgerConnection(asyncpg.Connection):
    """A pooled connection that is not reset when the pool takes it back.

    asyncpg's reset (``CLOSE ALL; UNLISTEN *; RESET ALL`` and an advisory
    unlock) is one more round trip per group-commit flush, about a tenth of
    an online flush's. It would also undo the session's durable commit
    (``_durable_session``). Ledger sessions keep no other state past a
    transaction: no LISTEN, no other session SET, no cursor outside a
    transaction, and the one
    session advisory lock (migrations) is released in a ``finally``. A
    transaction left open is still rolled back by asyncpg before reuse.
    """

    def get_reset_query(self) -> str:
        return ""


async def create_ledger_pool(
    dsn: str, size: int, lock_timeout_ms: int = 0, **kwargs: Any
) -> asyncpg.Pool:
    """``lock_timeout_ms``: how long a statement waits for a row lock (0: for ever).

    With no bound, one session holding a card's row (an operator's psql left
    in a transaction) stalled the only online flusher, and with it every
    debit of every card, until each caller's deadline; bounded, the batch
    fails with a lock timeout, its callers are told to retry (UNAVAILABLE),
    and the next batch goes on.
    """
    settings = dict(SESSION_SETTINGS)
    if lock_timeout_ms:
        settings["lock_timeout"] = f"{lock_timeout_ms}ms"
    return await asyncpg.create_pool(
        dsn,
        min_size=min(2, size),
        max_size=size,
        server_settings=settings,
        connection_class=LedgerConnection,
        init=_durable_session,
        **kwargs,
    )
