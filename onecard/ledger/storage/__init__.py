"""PostgreSQL storage: migrations and the set-based SQL of each batch."""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

#: What storage functions accept: a bare connection or one borrowed from a pool.
#: asyncpg hands out proxies from pools; the stubs keep the two types apart.
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
