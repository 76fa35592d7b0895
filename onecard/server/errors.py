"""How ledger exceptions become gRPC status codes.

Business outcomes never come through here: they are statuses in replies.
What does: malformed fields (INVALID_ARGUMENT naming the field), a full
queue (RESOURCE_EXHAUSTED, at once), and a database that cannot be reached
(UNAVAILABLE — safe to retry, since every write is idempotent).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import grpc

from onecard.ledger.batcher import Overloaded
from onecard.ledger.crypto.encoding import FieldError

log = logging.getLogger(__name__)
T = TypeVar("T")

_OUTAGE = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    ConnectionError,
    OSError,
    TimeoutError,
)


async def guarded(
    context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[T]]
) -> T:
    try:
        return await call()
    except FieldError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except Overloaded as exc:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    except _OUTAGE as exc:
        log.warning("database unavailable: %s", type(exc).__name__)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "ledger database unavailable; retry")
    raise AssertionError("unreachable")  # context.abort always raises
