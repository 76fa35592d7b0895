"""PostgreSQL storage: migrations and the set-based SQL of each batch."""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

#: What storage functions accept: a bare connection or one borrowed from a pool.
#: asyncpg hands out proxies from pools; the stubs keep the two types apart.
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"


class Contention(Exception):
    """Concurrent writers kept taking the same keys; nothing was written.

    Every write is idempotent, so the caller may retry: the server answers
    it as UNAVAILABLE, as it does a database outage.
    """
