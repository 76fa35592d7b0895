"""Two upload flushes that hold the same (terminal, seq) keys in opposite orders.

A record of a card the ledger does not hold takes no card lock, so two
flushes with the same such records (a gateway's batch and its retry reaching
the other flusher, one of them listing the records backwards) meet only in
the unique indexes of terminal_txns and quarantine, each waiting for the
other's uncommitted row. Inserted in each batch's own order they deadlocked
and one gateway got an error instead of its outcomes. Here both flushes are
made to start their first insert at the same moment, each runs again after
losing a race as the engine does, and both must end with the right outcomes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import asyncpg
import pytest

from onecard.ledger.crypto.verifier import MAC_BAD, MAC_OK
from onecard.ledger.devdata import seed_demo_data
from onecard.ledger.engine import fingerprint
from onecard.ledger.model import (
    OfflineRecord,
    OfflineResult,
    QuarantineReason,
    RecordOutcome,
)
from onecard.ledger.refdata import ReferenceData
from onecard.ledger.storage.offline_batch import PreparedRecord, apply_offline_batch
from onecard.ledger.storage.terminal_batch import BatchRaced
from tests.support import assert_books_balance, fetch

BUS = "310400000001"
STRANGER = "3104999999999997"  # a card this ledger never issued
RECORDS = 3000


class AtOnce:
    """A connection whose first insert waits until the other flush reaches its own."""

    def __init__(self, conn: asyncpg.Connection, barrier: asyncio.Barrier) -> None:
        self._conn = conn
        self._barrier: asyncio.Barrier | None = barrier

    async def _meet(self, query: str) -> None:
        if self._barrier is not None and "INSERT INTO" in query:
            barrier, self._barrier = self._barrier, None
            await barrier.wait()

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        await self._meet(query)
        return await self._conn.fetchrow(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        await self._meet(query)
        return await self._conn.execute(query, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _records(mac_code: int) -> list[PreparedRecord]:
    when = dt.datetime(2026, 11, 23, 7, 30)
    items = []
    for seq in range(1, RECORDS + 1):
        record = OfflineRecord(
            STRANGER, 1, 6, BUS, seq, "20261123073000", 1, seq.to_bytes(4, "big"), seq, 10**6
        )
        items.append(
            PreparedRecord(record, int(STRANGER), int(BUS), fingerprint(record), mac_code, when)
        )
    return items


async def _flush(conn: Any, ref: ReferenceData, items: list[PreparedRecord]) -> list[OfflineResult]:
    """One flush, run again after losing a race for a key (as Ledger._apply does)."""
    for _ in range(5):
        try:
            return await apply_offline_batch(conn, ref, items)
        except BatchRaced:
            continue
    raise AssertionError("the flush kept racing")


@pytest.mark.parametrize("trusted", [True, False], ids=["tac-valid", "tac-invalid"])
async def test_flushes_with_the_same_records_in_opposite_orders_both_complete(
    db_dsn: str, trusted: bool
) -> None:
    conns = [await asyncpg.connect(db_dsn) for _ in range(2)]
    try:
        await seed_demo_data(conns[0])
        ref = await ReferenceData.load(conns[0])
        items = _records(MAC_OK if trusted else MAC_BAD)
        barrier = asyncio.Barrier(2)
        forward, backward = await asyncio.gather(
            _flush(AtOnce(conns[0], barrier), ref, items),
            _flush(AtOnce(conns[1], barrier), ref, items[::-1]),
        )
    finally:
        for conn in conns:
            await conn.close()
    backward.reverse()  # aligned with forward: record by record

    if trusted:
        # A genuine record of an unknown card claims its identity: one flush
        # quarantined them all, the other found them there (duplicates).
        first = QuarantineReason.UNKNOWN_CARD
        for a, b in zip(forward, backward, strict=True):
            assert sorted([a.outcome, b.outcome]) == [
                RecordOutcome.DUPLICATE,
                RecordOutcome.QUARANTINED,
            ]
            assert a.quarantine_reason is b.quarantine_reason is first
            dup = a if a.outcome is RecordOutcome.DUPLICATE else b
            assert dup.original_outcome is RecordOutcome.QUARANTINED
    else:
        # Untrusted content claims nothing: both flushes quarantine it, one copy kept.
        assert {(r.outcome, r.quarantine_reason) for r in forward + backward} == {
            (RecordOutcome.QUARANTINED, QuarantineReason.TAC_INVALID)
        }
    counts = await fetch(
        db_dsn,
        "SELECT (SELECT count(*) FROM quarantine) AS kept,"
        " (SELECT count(DISTINCT terminal_seq) FROM quarantine) AS seqs,"
        " (SELECT count(*) FROM terminal_txns) AS txns,"
        " (SELECT count(*) FROM postings WHERE kind = 1) AS purchases",
    )
    assert dict(counts[0]) == {
        "kept": RECORDS,
        "seqs": RECORDS,
        "txns": RECORDS if trusted else 0,
        "purchases": 0,
    }
    await assert_books_balance(db_dsn)
