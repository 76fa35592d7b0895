"""Two writers claim the same (terminal, seq) between one batch's look-up and its insert.

Several server processes share one database, each with its own batchers, so a
gateway retry can reach another process while the first attempt is still in
flight. The batch that loses the race must roll back whole and run again,
answering the record as a duplicate of the winner: posted once, never twice,
never lost. The window is opened deterministically here by committing the
rival batch from inside the first batch's transaction, right after its
look-up of earlier outcomes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from onecard.clients.population import BASE_CARD, seed_cards
from onecard.ledger.crypto.verifier import MAC_OK
from onecard.ledger.devdata import seed_demo_data
from onecard.ledger.engine import fingerprint
from onecard.ledger.lifecycle import Replacement, ReplaceReason
from onecard.ledger.model import (
    Debit,
    OfflineRecord,
    RecordException,
    RecordOutcome,
    TxnKind,
    TxnStatus,
)
from onecard.ledger.pii import PiiProtector
from onecard.ledger.refdata import ReferenceData
from onecard.ledger.storage.lifecycle import Context, replace_card
from onecard.ledger.storage.offline_batch import PreparedRecord, apply_offline_batch
from onecard.ledger.storage.terminal_batch import BatchRaced, Prepared, apply_terminal_batch
from tests.support import assert_books_balance, fetch

BUS = "310400000001"
WHEN = "20261123073000"
CARD = str(BASE_CARD + 1)
OTHER_CARD = str(BASE_CARD + 0)


_LOOKUP = "FROM unnest($1::bigint[], $2::bigint[]) AS k(terminal_id, terminal_seq)"


class RivalFirst:
    """A connection that lets a rival commit right after the batch runs one read.

    By default the read is the look-up of earlier outcomes by (terminal, seq).
    """

    def __init__(
        self,
        conn: asyncpg.Connection,
        rival: Callable[[], Awaitable[object]],
        after: str = _LOOKUP,
    ) -> None:
        self._conn = conn
        self._rival: Callable[[], Awaitable[object]] | None = rival
        self._after = after

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        rows = await self._conn.fetch(query, *args)
        if self._after in query:
            rival, self._rival = self._rival, None
            if rival is not None:
                await rival()
        return rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


#: The batch's connection, the rival's, and the reference data both use.
Conns = tuple[asyncpg.Connection, asyncpg.Connection, ReferenceData]


@pytest.fixture
async def conns(db_dsn: str) -> AsyncIterator[Conns]:
    first = await asyncpg.connect(db_dsn)
    rival = await asyncpg.connect(db_dsn)
    await seed_demo_data(first)
    await seed_cards(first, 2, 10_000, 2)
    try:
        yield first, rival, await ReferenceData.load(first)
    finally:
        await first.close()
        await rival.close()


def _offline(seq: int) -> PreparedRecord:
    record = OfflineRecord(CARD, 300, 9, BUS, seq, WHEN, 2, b"\x01\x02\x03\x04", 1, 10_000)
    return PreparedRecord(
        record, int(CARD), int(BUS), fingerprint(record), MAC_OK, dt.datetime(2026, 11, 23, 7, 30)
    )


def _debit(seq: int, card: str = CARD) -> Prepared:
    debit = Debit(card, 300, 6, BUS, seq, WHEN, 2, b"\x01\x02\x03\x04")
    return Prepared(
        debit,
        TxnKind.DEBIT,
        int(card),
        int(BUS),
        fingerprint(debit),
        MAC_OK,
        b"",
        dt.datetime(2026, 11, 23, 7, 30),
    )


async def _purchases(dsn: str) -> list[tuple[int, int]]:
    rows = await fetch(dsn, "SELECT terminal_seq, amount FROM postings WHERE kind = 1")
    return [(r["terminal_seq"], r["amount"]) for r in rows]


async def test_offline_batch_that_loses_the_race_runs_again_as_duplicate(
    conns: Conns, db_dsn: str
) -> None:
    first, rival, ref = conns
    item = _offline(700)

    async def rival_upload() -> None:
        (won,) = await apply_offline_batch(rival, ref, [_offline(700)])
        assert won.outcome is RecordOutcome.POSTED

    with pytest.raises(BatchRaced):
        await apply_offline_batch(RivalFirst(first, rival_upload), ref, [item])  # type: ignore[arg-type]
    (again,) = await apply_offline_batch(first, ref, [item])
    assert again.outcome is RecordOutcome.DUPLICATE
    assert again.original_outcome is RecordOutcome.POSTED
    assert again.balance_after == 9_700
    assert await _purchases(db_dsn) == [(700, 300)]
    await assert_books_balance(db_dsn)


async def test_online_batch_that_loses_the_race_to_another_card_runs_again_as_conflict(
    conns: Conns, db_dsn: str
) -> None:
    # The online batch locks its cards in the same statement that looks its
    # keys up, so a rival can only slip in with another card under the same
    # (terminal, seq): a terminal that reused a sequence number.
    first, rival, ref = conns
    item = _debit(800)

    async def rival_debit() -> None:
        (won,) = await apply_terminal_batch(rival, ref, [_debit(800, OTHER_CARD)])
        assert won.status is TxnStatus.APPROVED

    with pytest.raises(BatchRaced):
        await apply_terminal_batch(RivalFirst(first, rival_debit), ref, [item])  # type: ignore[arg-type]
    (again,) = await apply_terminal_batch(first, ref, [item])
    assert again.status is TxnStatus.CONFLICT
    assert await _purchases(db_dsn) == [(800, 300)]
    rows = await fetch(db_dsn, "SELECT card_no FROM postings WHERE kind = 1")
    assert [r["card_no"] for r in rows] == [int(OTHER_CARD)]
    balances = await fetch(db_dsn, "SELECT purse_balance FROM cards ORDER BY card_no")
    assert [r["purse_balance"] for r in balances] == [9_700, 10_000]
    await assert_books_balance(db_dsn)


async def test_offline_batch_whose_card_is_replaced_meanwhile_runs_again_and_pays_from_the_new_card(
    conns: Conns, db_dsn: str
) -> None:
    """A replacement committed between the batch's look-up of successors and its lock.

    The new card is not among the cards the batch locked, so the record's
    money could not follow to it: the batch notices, rolls back whole and
    runs again, and the amount follows to the new card as for any late
    record of a replaced card.
    """
    first, rival, ref = conns
    new_card = BASE_CARD + 5

    async def rival_replace() -> None:
        ctx = Context(ref, PiiProtector(b"k" * 32), 0.0)
        req = Replacement("r-1", "staff", CARD, str(new_card), 2, ReplaceReason.DAMAGED)
        async with rival.transaction():
            await replace_card(ctx, rival, req)

    item = _offline(701)
    with pytest.raises(BatchRaced):
        racing = RivalFirst(first, rival_replace, after="WITH RECURSIVE chain")
        await apply_offline_batch(racing, ref, [item])  # type: ignore[arg-type]
    assert await _purchases(db_dsn) == []
    (again,) = await apply_offline_batch(first, ref, [item])
    assert again.outcome is RecordOutcome.POSTED_WITH_EXCEPTION
    balances = {
        r["card_no"]: r["purse_balance"]
        for r in await fetch(db_dsn, "SELECT card_no, purse_balance FROM cards")
    }
    assert balances[int(CARD)] == 0
    assert balances[new_card] == 10_000 - 300
    assert await _purchases(db_dsn) == [(701, 300)]
    await assert_books_balance(db_dsn)


async def test_a_rerun_reads_what_the_chip_holds_again(conns: Conns, db_dsn: str) -> None:
    """A replaced card's late records raced by another writer: the rerun reads
    the card's chip adjustment as the rival left it, and moves it once more,
    not twice (found reviewing migration 0018)."""
    first, rival, ref = conns
    ctx = Context(ref, PiiProtector(b"k" * 32), 0.0)
    req = Replacement("r-chip", "staff", CARD, str(BASE_CARD + 5), 2, ReplaceReason.DAMAGED)
    async with first.transaction():
        await replace_card(ctx, first, req)

    def late(seq: int, counter: int, before: int) -> PreparedRecord:
        record = OfflineRecord(
            CARD, 300, 9, BUS, seq, WHEN, 2, b"\x01\x02\x03\x04", counter, before
        )
        return PreparedRecord(
            record,
            int(CARD),
            int(BUS),
            fingerprint(record),
            MAC_OK,
            dt.datetime(2026, 11, 23, 7, 30),
        )

    async def rival_upload() -> None:
        (won,) = await apply_offline_batch(rival, ref, [late(700, 1, 10_000)])
        assert won.exceptions == (RecordException.CARD_BLOCKED,)

    items = [late(700, 1, 10_000), late(701, 2, 9_700)]
    with pytest.raises(BatchRaced):
        await apply_offline_batch(RivalFirst(first, rival_upload), ref, items)  # type: ignore[arg-type]
    dup, new = await apply_offline_batch(first, ref, items)
    assert dup.outcome is RecordOutcome.DUPLICATE
    assert new.exceptions == (RecordException.CARD_BLOCKED,)
    rows = await fetch(db_dsn, "SELECT chip_adjust FROM cards WHERE card_no = $1", int(CARD))
    assert rows[0]["chip_adjust"] == 9_400
    await assert_books_balance(db_dsn)
