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


class LedgerConnection(asyncpg.Connection):
    """A pooled connection that is not reset when the pool takes it back.

    asyncpg's reset (``CLOSE ALL; UNLISTEN *; RESET ALL`` and an advisory
    unlock) is one more round trip per group-commit flush, about a tenth of
    an online flush's. Ledger sessions keep no state past a transaction: no
    LISTEN, no session SET, no cursor outside a transaction, and the one
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
        **kwargs,
    )
