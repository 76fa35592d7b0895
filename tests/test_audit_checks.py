"""The checks that prove the books find what they are there to find.

Every other test asserts these checks come back clean; a check that never
finds anything passes all of them. Here a sound ledger is made wrong the way
a bug would leave it (a balance written without its posting, a chip
adjustment forgotten), each time in a way the trial balance alone cannot
see, and the check must name the account or card.
"""

from __future__ import annotations

import asyncpg
import grpc

from onecard.clients.terminal import Terminal
from onecard.ledger.accounts import deposit_account
from onecard.ledger.audit import (
    Discrepancy,
    balance_discrepancies,
    chip_adjust_discrepancies,
    trial_balance,
)
from onecard.ledger.keys import MemoryKeyStore
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2
from tests.desk_support import BUS, funded
from tests.support import assert_books_balance


async def _tampered(dsn: str, sql: str, *args: object) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await conn.execute(sql, *args)
    return conn


async def test_a_deposit_moved_between_cards_without_postings_is_named(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    first, second = await funded(channel, keys, 1000), await funded(channel, keys, 1000)
    debit = await Terminal(channel, BUS, 500).debit(first, 300)
    assert debit.status == common_pb2.TXN_STATUS_APPROVED
    await assert_books_balance(server.dsn)
    conn = await _tampered(
        server.dsn,
        "UPDATE cards SET deposit_balance = deposit_balance + "
        "CASE WHEN card_no = $1 THEN -500 ELSE 500 END WHERE card_no IN ($1, $2)",
        int(first.card_no),
        int(second.card_no),
    )
    try:
        assert await trial_balance(conn) == 0  # the sum cannot see it
        assert await balance_discrepancies(conn) == sorted(
            [
                Discrepancy(deposit_account(int(first.card_no)), 1500, 2000),
                Discrepancy(deposit_account(int(second.card_no)), 2500, 2000),
            ],
            key=lambda d: d.account,
        )
    finally:
        await conn.close()


async def test_a_deposit_changed_alone_fails_the_trial_balance_and_is_named(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 1000)
    conn = await _tampered(
        server.dsn,
        "UPDATE cards SET deposit_balance = deposit_balance + 1 WHERE card_no = $1",
        int(card.card_no),
    )
    try:
        assert await trial_balance(conn) == 1
        assert await balance_discrepancies(conn) == [
            Discrepancy(deposit_account(int(card.card_no)), 2001, 2000)
        ]
    finally:
        await conn.close()


async def test_a_chip_adjustment_no_posting_explains_is_named(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A move the chip did not see, recorded without its posting (or a posting
    whose move was forgotten): the card's next record would be judged wrong."""
    card, other = await funded(channel, keys, 1000), await funded(channel, keys, 1000)
    await assert_books_balance(server.dsn)
    conn = await _tampered(
        server.dsn,
        "UPDATE cards SET chip_adjust = chip_adjust + 250 WHERE card_no = $1",
        int(card.card_no),
    )
    try:
        assert await trial_balance(conn) == 0 and await balance_discrepancies(conn) == []
        assert await chip_adjust_discrepancies(conn) == [(int(card.card_no), 250, 0)]
        assert int(other.card_no) not in [c for c, _, _ in await chip_adjust_discrepancies(conn)]
    finally:
        await conn.close()


async def test_a_hot_account_slot_changed_alone_fails_the_trial_balance_and_is_named(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A hot account's balance is spread over per-batch slots (migration 0007); a
    check that summed only ``accounts`` would not see a slot written without its
    posting (found by the mutation audit: no test tampered with a slot)."""
    card = await funded(channel, keys, 1000)
    debit = await Terminal(channel, BUS, 600).debit(card, 300)
    assert debit.status == common_pb2.TXN_STATUS_APPROVED
    await assert_books_balance(server.dsn)
    conn = await asyncpg.connect(server.dsn)
    try:
        slot = await conn.fetchrow(
            "SELECT account_id, slot FROM account_slots WHERE balance <> 0 "
            "ORDER BY account_id, slot LIMIT 1"
        )
        assert slot is not None, "a debit leaves a payable's balance in a slot"
        stored = await conn.fetchval(
            "SELECT balance FROM account_balances WHERE account_id = $1", slot["account_id"]
        )
        await conn.execute(
            "UPDATE account_slots SET balance = balance + 7 WHERE account_id = $1 AND slot = $2",
            slot["account_id"],
            slot["slot"],
        )
        assert await trial_balance(conn) == 7
        assert await balance_discrepancies(conn) == [
            Discrepancy(slot["account_id"], stored + 7, stored)
        ]
    finally:
        await conn.close()
