"""PostgreSQL storage: migrations and the set-based SQL of each batch."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from onecard.ledger.batcher import ItemsHeld

#: What storage functions accept: a bare connection or one borrowed from a pool.
#: asyncpg hands out proxies from pools; the stubs keep the two types apart.
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"


class Contention(Exception):
    """Concurrent writers kept taking the same keys; nothing was written.

    Every write is idempotent, so the caller may retry: the server answers
    it as UNAVAILABLE, as it does a database outage.
    """


class CardsHeld(ItemsHeld):
    """Cards whose rows another session held past the lock timeout; nothing was written.

    Only the requests for these cards are refused (the server answers them
    UNAVAILABLE, so terminals resend); the rest of their batch is written
    without them. The message names no card: it reaches every caller refused.
    """

    #: The ledger setting whose limit this is (the server names its flag).
    setting = "lock_timeout_ms"

    def __init__(self, cards: set[int]) -> None:
        super().__init__(
            "the card's record is locked by another database session past the lock "
            "timeout; nothing was written, retry"
        )
        self.cards = cards

    def holds(self, item: Any) -> bool:
        return int(item.card_no) in self.cards
