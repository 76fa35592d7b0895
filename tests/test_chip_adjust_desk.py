"""The desk's own moves the chip does not see: payouts at cancellation and dispute refunds.

Found by review of the chip adjustment's second version: a cancellation's
payout and a dispute refund moved the ledger purse alone, so a correct chip's
next record was a BALANCE_MISMATCH. Every test's books check now also holds
each card's adjustment to the purse postings its chip did not see
(onecard/ledger/audit.py), which is how the moves below are pinned.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace as dc_replace

import asyncpg
import grpc

from onecard.clients.gateway import Gateway, offline_record
from onecard.clients.terminal import Terminal, now_bcd_text
from onecard.ledger.audit import chip_adjust_discrepancies
from onecard.ledger.keys import MemoryKeyStore
from onecard.ledger.storage.migrate import available_migrations
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, desk_pb2, upload_pb2
from tests.desk_support import BUS, OK, cancel, desk, funded, rid
from tests.support import STAFF, assert_books_balance, fetch
from tests.test_chip_adjust import reversal_over_a_chain

BUS2 = "310400000002"
BLOCKED = upload_pb2.RECORD_EXCEPTION_CARD_BLOCKED
POSTED = upload_pb2.RECORD_OUTCOME_POSTED


async def _details(dsn: str, card_no: str) -> list[str]:
    rows = await fetch(
        dsn, "SELECT detail FROM finance_exceptions WHERE card_no = $1 AND kind = $2",
        int(card_no), int(upload_pb2.RECORD_EXCEPTION_BALANCE_MISMATCH),
    )  # fmt: skip
    return [r["detail"] for r in rows]


async def test_dispute_refund_then_an_offline_ride_with_a_correct_chip(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """The refund credits the ledger purse only; the chip never gets it."""
    card = await funded(channel, keys, 1000)
    assert (await Terminal(channel, BUS).debit(card, 300)).status == common_pb2.TXN_STATUS_APPROVED
    (row,) = await fetch(
        server.dsn,
        "SELECT posting_id FROM postings WHERE card_no = $1 AND kind = 1",
        int(card.card_no),
    )
    reply = await desk(channel).RefundPosting(
        desk_pb2.RefundPostingRequest(
            request_id=rid(), card_number=card.card_no, posting_id=row["posting_id"],
            amount=300, case_reference="C-1", reason="double charge",
        ),
        metadata=STAFF,
    )  # fmt: skip
    assert reply.status == OK and reply.card.balance == 1000
    ride = offline_record(card, 100, BUS2, 90, now_bcd_text())  # chip: 700 before
    (up,) = await Gateway(channel).upload_records([ride])
    assert await _details(server.dsn, card.card_no) == []
    assert [r.outcome for r in up.results] == [POSTED]
    await assert_books_balance(server.dsn)


async def test_readable_cancellation_then_the_ride_the_chip_showed(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """The desk pays the chip's 2750 and leaves 250 for the ride not yet in."""
    card = await funded(channel, keys, 3000)
    ride = offline_record(card, 250, BUS2, 91, now_bcd_text())  # chip: 3000 -> 2750
    reply = await cancel(channel, card.card_no, readable=True, card_balance=card.balance)
    assert reply.status == OK and reply.card.balance == 250
    (up,) = await Gateway(channel).upload_records([ride])
    assert await _details(server.dsn, card.card_no) == []
    assert [list(r.exceptions) for r in up.results] == [[BLOCKED]]
    await assert_books_balance(server.dsn)


async def test_held_refund_paid_then_a_late_ride(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """The refund job pays the purse out; a ride made before the desk visit comes after."""
    lifecycle = server.ledger.lifecycle
    lifecycle.settings = dc_replace(lifecycle.settings, refund_hold=3600)
    card = await funded(channel, keys, 3000)
    ride = offline_record(card, 400, BUS2, 92, now_bcd_text())  # chip: 3000 before
    reply = await cancel(channel, card.card_no, readable=False)
    assert reply.status == desk_pb2.DESK_STATUS_REFUND_PENDING
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    assert await lifecycle.pay_due_refunds(later) == [card.card_no]
    (up,) = await Gateway(channel).upload_records([ride])
    assert await _details(server.dsn, card.card_no) == []
    # Negative is right: the holder was paid 3000 and rode 400 on it too.
    assert [list(r.exceptions) for r in up.results] == [
        [BLOCKED, upload_pb2.RECORD_EXCEPTION_NEGATIVE_BALANCE]
    ]
    await assert_books_balance(server.dsn)


async def test_migration_0018_works_the_adjustments_out_from_the_postings(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """Cards moved before 0018 get what their postings say, not 0."""
    await reversal_over_a_chain(channel, keys, 2, 170)
    await test_readable_cancellation_then_the_ride_the_chip_showed(server, channel, keys)
    await test_dispute_refund_then_an_offline_ride_with_a_correct_chip(server, channel, keys)
    await fetch(server.dsn, "UPDATE cards SET chip_adjust = 0")  # as the column began
    migration = next(m for m in available_migrations() if m.version == 18)
    backfill = migration.sql.split(";", 1)[1]  # what follows ADD COLUMN
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(backfill)
        assert await chip_adjust_discrepancies(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM cards WHERE chip_adjust <> 0") > 0
    finally:
        await conn.close()
