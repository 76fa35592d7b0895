"""An issuer added while the server processes run: every process serves its cards.

Each process keeps the reference data (issuers, products, system accounts)
it read at start. A card of an issuer added later, issued on one worker, was
cancelled on another with gRPC UNKNOWN on every retry (its cash account
unknown there), and that worker's held-refund job stopped for good at the
first such refund, leaving the rest unpaid. Found by review.
"""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import asyncpg
import grpc

from onecard.ledger.devdata import DEV_KEYS, ensure_issuer_accounts
from onecard.ledger.keys import MemoryKeyStore, parse_key_document
from onecard.v1 import common_pb2, desk_pb2, desk_pb2_grpc
from tests.desk_support import issue_at_desk, rid
from tests.support import STAFF, assert_books_balance, fetch, start_test_server

NEW_ISSUER = "3205"


def _keys() -> MemoryKeyStore:
    doc = copy.deepcopy(DEV_KEYS)
    doc["issuers"][NEW_ISSUER] = doc["issuers"]["3104"]
    return MemoryKeyStore(parse_key_document(doc, "test keys"))


async def test_a_worker_started_before_the_issuer_was_added_serves_its_cards(
    db_dsn: str, tmp_path: Path
) -> None:
    first = await start_test_server(db_dsn, tmp_path / "first", _keys())
    second = await start_test_server(db_dsn, tmp_path / "second", _keys())
    try:
        conn = await asyncpg.connect(db_dsn)
        try:
            await conn.execute("INSERT INTO issuers VALUES ($1, 'added while running')", NEW_ISSUER)
            await ensure_issuer_accounts(conn, NEW_ISSUER)
        finally:
            await conn.close()
        async with (
            grpc.aio.insecure_channel(first.address) as on_first,
            grpc.aio.insecure_channel(second.address) as on_second,
        ):
            issuing = desk_pb2_grpc.DeskServiceStub(on_first)
            cards = [f"{NEW_ISSUER}00000000000{i}" for i in (1, 2)]
            for card_no in cards:
                await issue_at_desk(on_first, card_no)

            # Cancelled with the card at hand on the worker that had not seen the issuer.
            cancelled = await desk_pb2_grpc.DeskServiceStub(on_second).CancelCard(
                desk_pb2.CancelCardRequest(
                    request_id=rid(),
                    card_number=cards[0],
                    refund_channel=common_pb2.PAYMENT_CHANNEL_CASH,
                    card_readable=True,
                    card_balance=0,
                ),
                metadata=STAFF,
            )
            assert cancelled.status == desk_pb2.DESK_STATUS_OK, cancelled.detail
            assert cancelled.card.status == common_pb2.CARD_STATUS_CLOSED

            # Without the card: the refund is held, and the other worker's job pays it.
            held = await issuing.CancelCard(
                desk_pb2.CancelCardRequest(
                    request_id=rid(),
                    card_number=cards[1],
                    refund_channel=common_pb2.PAYMENT_CHANNEL_CASH,
                    card_readable=False,
                ),
                metadata=STAFF,
            )
            assert held.status == desk_pb2.DESK_STATUS_REFUND_PENDING, held.detail
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
        await second.ledger.lifecycle.pay_due_refunds(later)
        unpaid = await fetch(db_dsn, "SELECT card_no FROM pending_refunds WHERE paid_at IS NULL")
        assert unpaid == []
        paid = await fetch(
            db_dsn,
            "SELECT deposit_paid FROM pending_refunds WHERE card_no = $1",
            int(cards[1]),
        )
        assert [tuple(r) for r in paid] == [(2000,)]
    finally:
        await first.stop()
        await second.stop()
    await assert_books_balance(db_dsn)
