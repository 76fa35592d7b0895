"""How ledger exceptions become gRPC status codes.

Business outcomes never come through here: they are statuses in replies.
What does: malformed fields (INVALID_ARGUMENT naming the field), a full
queue (RESOURCE_EXHAUSTED, at once), a system account the request posts to
missing from the setup (FAILED_PRECONDITION, naming it), and a database that
cannot be reached or a server going away (UNAVAILABLE — safe to retry, since
every write is idempotent).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any, TypeVar

import asyncpg
import grpc

from onecard.ledger.batcher import Overloaded, ShuttingDown
from onecard.ledger.crypto.encoding import FieldError
from onecard.ledger.refdata import AccountsMissing, StaleReference
from onecard.ledger.storage import CardsHeld, Contention
from onecard.ledger.storage.pool import NotDurable
from onecard.server.config import flag_for
from onecard.server.metrics import observe_call

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Whatever a retry may cure: the database unreachable, restarting after a
#: crash (57P02), shut down or cancelling statements (class 57), a standby
#: promoted under us answering read-only, out of connections, a transaction
#: rolled back for a deadlock or a serialization failure (class 40), writers
#: racing each other. (A lock held past --lock-timeout-ms, 55P03, is retried
#: too, but is no outage: see LOCK_HELD.)
#: Every write is idempotent, so UNAVAILABLE (which clients retry) is the
#: honest answer; UNKNOWN would make a terminal give up.
_OUTAGE = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.TransactionRollbackError,
    Contention,
    ConnectionError,
    OSError,
    TimeoutError,
)


LOCK_HELD = (
    "a lock the call needs was held by another database session past the lock timeout; "
    "nothing was written, retry"
)


class TooManyStreams(Exception):
    """As many upload streams are open as --max-upload-streams allows (in this process)
    or, on one connection, as --max-upload-streams-per-connection allows."""

    def __init__(self, limit: int, *, per_connection: bool = False) -> None:
        self.setting = (
            "max_upload_streams_per_connection" if per_connection else "max_upload_streams"
        )
        where = "on this connection" if per_connection else "in this server process"
        super().__init__(
            f"{limit} upload streams are open {where}, its limit; "
            "retry later or send on a stream already open"
        )


class StreamIdle(Exception):
    """An upload stream sent no batch for --upload-idle-s: it is ended to free its place."""

    setting = "upload_idle_s"

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"no batch on this upload stream for {seconds:g}s: it is closed to give its "
            "place back; open a new one when there is more to send"
        )


def _with_setting(details: str, setting: str) -> str:
    """``details`` naming the flag that sets the limit it reports, when a flag does.

    An operator who sees the refusal then knows what to change; the ledger
    carries only its setting's name (it knows no flags).
    """
    flag = flag_for(setting) if setting else None
    return f"{details} [limit set by {flag}]" if flag else details


async def guarded(
    context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[T]]
) -> T:
    """Run a servicer's ``call``, map ledger exceptions to statuses, and time it.

    Every servicer method goes through here, so this is where the call
    histogram (onecard_rpc_duration_seconds) is fed: labelled by the method
    the closure belongs to and the status it ended with.
    """
    began = perf_counter()
    try:
        result = await call()
    except FieldError as exc:
        status, details = (
            grpc.StatusCode.INVALID_ARGUMENT,
            _with_setting(str(exc), getattr(exc, "setting", "")),
        )
    except Overloaded as exc:
        status, details = (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            _with_setting(str(exc), exc.committer),
        )
    except TooManyStreams as exc:
        status, details = (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            _with_setting(str(exc), exc.setting),
        )
    except ShuttingDown as exc:
        status, details = grpc.StatusCode.UNAVAILABLE, str(exc)
    except CardsHeld as exc:
        status, details = grpc.StatusCode.UNAVAILABLE, _with_setting(str(exc), exc.setting)
    except asyncpg.exceptions.LockNotAvailableError:
        # A table or account lock held past the lock timeout (an ALTER TABLE,
        # a session left open). It was answered and logged as a database
        # outage while health said SERVING, and the operator went looking for
        # one: it is a setting, and a session to find.
        log.warning("a lock was held past the lock timeout by another database session")
        status, details = grpc.StatusCode.UNAVAILABLE, _with_setting(LOCK_HELD, "lock_timeout_ms")
    except AccountsMissing as exc:
        # Logged by the ledger when it refused them: the operator must set
        # the account up. Nothing of the call was written.
        status, details = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    except StaleReference as exc:
        # The same setup mistake met by a call of its own (a desk call through
        # a channel whose cash account is missing), still missing after a
        # re-read: nothing of it was written.
        log.error("%s: the call is refused until it is set up", exc)
        status, details = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    except StreamIdle as exc:
        status, details = grpc.StatusCode.UNAVAILABLE, _with_setting(str(exc), exc.setting)
    except NotDurable as exc:
        # A connection opened mid-run to a database that can no longer keep
        # what it confirms (fsync turned off and reloaded): nothing was
        # written on it. The operator must act; the caller may retry.
        log.error("database refused for durability: %s", exc)
        status, details = grpc.StatusCode.UNAVAILABLE, "ledger database unavailable; retry"
    except _OUTAGE as exc:
        log.warning("database unavailable: %s", type(exc).__name__)
        status, details = grpc.StatusCode.UNAVAILABLE, "ledger database unavailable; retry"
    except grpc.aio.AbortError:
        # The servicer refused the call itself (a desk call without a staff id).
        refused = context.code()
        observe_call(
            call,
            refused.name if isinstance(refused, grpc.StatusCode) else "ABORTED",
            perf_counter() - began,
        )
        raise
    except asyncio.CancelledError:
        observe_call(call, "CANCELLED", perf_counter() - began)
        raise
    except BaseException:
        observe_call(call, "UNKNOWN", perf_counter() - began)
        raise
    else:
        observe_call(call, "OK", perf_counter() - began)
        return result
    # Counted before the status goes out: abort sends it at once, and a
    # scrape right after the caller's error missed the call (a flaky test).
    observe_call(call, status.name, perf_counter() - began)
    await context.abort(status, details)
    raise AssertionError("unreachable")  # context.abort always raises
