"""An uploaded record's reported balance against what the chip should hold, not the purse alone.

A replacement empties the old card's purse into the new card's while the old
chip keeps its money, and a late record of the old card takes its amount
from the newest card of the chain, whose chip (written at replacement) never
sees it. Every late record of a replaced card was a BALANCE_MISMATCH, and so
was every later record of the card its amount followed from, though each
chip was right. What moved without the chip is kept on the card
(``cards.chip_adjust``, migration 0018) and counted in the comparison. The
chain and reversal cases were found by review of a first version that kept
only the replaced card's own purse.
"""

from __future__ import annotations

from dataclasses import replace as dc_replace

import grpc
import pytest

from onecard.clients.card import SimulatedCard
from onecard.clients.gateway import Gateway, offline_record
from onecard.clients.terminal import Terminal, now_bcd_text
from onecard.ledger.keys import MemoryKeyStore
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, desk_pb2, upload_pb2
from tests.desk_support import (
    BUS,
    OK,
    TOPUP,
    funded,
    get_card,
    replace,
    reverse_request,
    terminal_stub,
)
from tests.support import assert_books_balance, fetch, issue, issuer_key, new_card_number

BLOCKED = upload_pb2.RECORD_EXCEPTION_CARD_BLOCKED
POSTED = upload_pb2.RECORD_OUTCOME_POSTED
APPROVED = common_pb2.TXN_STATUS_APPROVED


async def _chip_adjust(dsn: str, card_no: str) -> int:
    (row,) = await fetch(dsn, "SELECT chip_adjust FROM cards WHERE card_no = $1", int(card_no))
    return int(row["chip_adjust"])


async def _replace_with_chip(
    channel: grpc.aio.Channel, keys: MemoryKeyStore, old: str
) -> SimulatedCard:
    """Replace ``old``; the new chip is written with the balance the desk answers."""
    new_no = new_card_number()
    reply = await replace(channel, old, new_no, desk_pb2.REPLACE_REASON_DAMAGED)
    assert reply.status == OK, reply
    return SimulatedCard(new_no, issuer_key(keys, 1), balance=reply.new_card.balance)


def _exceptions(reply: upload_pb2.UploadBatchReply) -> list[list[int]]:
    return [list(r.exceptions) for r in reply.results]


async def test_the_newest_cards_own_records_after_a_follow_are_not_mismatches(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    a = await funded(channel, keys, 3000)
    a_late = offline_record(a, 250, BUS, 10, now_bcd_text())  # a's chip: 2750 after
    b = await _replace_with_chip(channel, keys, a.card_no)  # b's chip: 3000
    (late,) = await Gateway(channel).upload_records([a_late])
    assert _exceptions(late) == [[BLOCKED]]
    assert (await get_card(channel, b.card_no)).balance == 2750  # the account paid it
    (own,) = await Gateway(channel).upload_records(
        [offline_record(b, 100, BUS, 11, now_bcd_text())]
    )
    assert [r.outcome for r in own.results] == [POSTED]  # chip 3000 = purse 2750 + 250
    assert await _chip_adjust(server.dsn, b.card_no) == 250
    await assert_books_balance(server.dsn)


async def test_a_chain_in_one_batch_either_order(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    for order in (0, 1):
        a = await funded(channel, keys, 3000)
        a_late = offline_record(a, 250, BUS, 20 + order * 10, now_bcd_text())
        b = await _replace_with_chip(channel, keys, a.card_no)
        b_late = offline_record(b, 100, BUS, 21 + order * 10, now_bcd_text())
        c = await _replace_with_chip(channel, keys, b.card_no)
        records = [a_late, b_late] if order == 0 else [b_late, a_late]
        (reply,) = await Gateway(channel).upload_records(records)
        assert _exceptions(reply) == [[BLOCKED], [BLOCKED]]
        assert [await _chip_adjust(server.dsn, x.card_no) for x in (a, b, c)] == [2750, 2900, 350]
        assert (await get_card(channel, c.card_no)).balance == 2650
        (own,) = await Gateway(channel).upload_records(
            [offline_record(c, 100, BUS, 22 + order * 10, now_bcd_text())]
        )
        assert [r.outcome for r in own.results] == [POSTED]
    await assert_books_balance(server.dsn)


async def test_b_replaced_after_a_late_record_followed_from_it(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """B's chip was written with 3000; A's late ride took 250 from B's purse
    only. B's late record after its own replacement reports 3000."""
    a = await funded(channel, keys, 3000)
    a_late = offline_record(a, 250, BUS, 40, now_bcd_text())
    b = await _replace_with_chip(channel, keys, a.card_no)
    (first,) = await Gateway(channel).upload_records([a_late])
    assert _exceptions(first) == [[BLOCKED]]
    b_late = offline_record(b, 100, BUS, 41, now_bcd_text())  # b's chip: 3000 before
    await _replace_with_chip(channel, keys, b.card_no)
    (second,) = await Gateway(channel).upload_records([b_late])
    assert _exceptions(second) == [[BLOCKED]]
    await assert_books_balance(server.dsn)


async def test_duplicates_conflicts_and_quarantine_move_nothing(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    a = await funded(channel, keys, 3000)
    twin = dc_replace(a)
    r1, r2 = (offline_record(a, 250, BUS, seq, now_bcd_text()) for seq in (51, 52))
    clash = offline_record(twin, 100, BUS, 51, now_bcd_text())  # genuine, other content
    forged = upload_pb2.OfflineRecord()
    forged.CopyFrom(r1)
    forged.terminal_seq = 53
    forged.tac = b"\x00\x00\x00\x00"
    await _replace_with_chip(channel, keys, a.card_no)
    gateway = Gateway(channel)
    (first,) = await gateway.upload_records([r1, r2, r1, forged, clash])
    assert [r.outcome for r in first.results] == [
        upload_pb2.RECORD_OUTCOME_POSTED_WITH_EXCEPTION,
        upload_pb2.RECORD_OUTCOME_POSTED_WITH_EXCEPTION,
        upload_pb2.RECORD_OUTCOME_DUPLICATE,
        upload_pb2.RECORD_OUTCOME_QUARANTINED,
        upload_pb2.RECORD_OUTCOME_CONFLICT,
    ]
    assert _exceptions(first)[:3] == [[BLOCKED]] * 3
    assert await _chip_adjust(server.dsn, a.card_no) == 2500
    (again,) = await gateway.upload_records([r2, r1, forged, clash])
    assert [r.outcome for r in again.results][:2] == [upload_pb2.RECORD_OUTCOME_DUPLICATE] * 2
    assert _exceptions(again)[:2] == [[BLOCKED]] * 2
    assert await _chip_adjust(server.dsn, a.card_no) == 2500
    await assert_books_balance(server.dsn)


async def test_a_reversed_load_of_a_replaced_card(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A reversed load was never completed by the card: its chip holds 3000,
    though the ledger held 4000 when it was replaced."""
    a = await issue(channel, keys)
    topup = Terminal(channel, TOPUP, 5)
    assert (await topup.load(a, 3000)).status == APPROVED  # seq 5
    pending = a.begin_load(1000, TOPUP)  # the card never completes this one
    assert (await topup.stub.Load(topup.load_request(a, pending, seq=6))).status == APPROVED
    late = offline_record(a, 250, BUS, 60, now_bcd_text())  # a's chip: 3000 before
    b = await _replace_with_chip(channel, keys, a.card_no)  # b's chip: 4000
    reverse = reverse_request(a.card_no, 1000, 7, 6, TOPUP)
    assert (await terminal_stub(channel).Reverse(reverse)).status == APPROVED
    assert (await get_card(channel, b.card_no)).balance == 3000
    (reply,) = await Gateway(channel).upload_records([late])
    assert _exceptions(reply) == [[BLOCKED]]
    (own,) = await Gateway(channel).upload_records(
        [offline_record(b, 100, BUS, 61, now_bcd_text())]
    )
    assert [r.outcome for r in own.results] == [POSTED]  # b's chip 4000, purse 2750 + 1250
    await assert_books_balance(server.dsn)


async def reversal_over_a_chain(
    channel: grpc.aio.Channel, keys: MemoryKeyStore, replacements: int, seq: int
) -> list[SimulatedCard]:
    """A's online debit undone by its terminal (its chip has the 300 again) after A
    was replaced ``replacements`` times; then A's late ride and the newest card's own.
    The cards of the chain, A first."""
    a = await funded(channel, keys, 1000)
    assert (await Terminal(channel, BUS, seq).debit(a, 300)).status == APPROVED
    a.balance += 300  # the cashier's mistake undone on the chip
    late = offline_record(a, 250, "310400000002", seq + 2, now_bcd_text())  # chip: 1000 before
    chain = [a]
    for _ in range(replacements):
        chain.append(await _replace_with_chip(channel, keys, chain[-1].card_no))
    reverse = reverse_request(a.card_no, 300, seq + 1, seq)
    assert (await terminal_stub(channel).Reverse(reverse)).status == APPROVED
    (reply,) = await Gateway(channel).upload_records([late])
    assert _exceptions(reply) == [[BLOCKED]]
    (own,) = await Gateway(channel).upload_records(
        [offline_record(chain[-1], 100, "310400000002", seq + 3, now_bcd_text())]
    )
    assert [r.outcome for r in own.results] == [POSTED]
    return chain


@pytest.mark.parametrize(("replacements", "adjustments"), [(1, [750, -50]), (2, [750, 700, -50])])
async def test_a_reversed_debit_of_a_replaced_card(
    server: RunningServer,
    channel: grpc.aio.Channel,
    keys: MemoryKeyStore,
    replacements: int,
    adjustments: list[int],
) -> None:
    chain = await reversal_over_a_chain(channel, keys, replacements, 70 + 10 * replacements)
    assert [await _chip_adjust(server.dsn, c.card_no) for c in chain] == adjustments
    await assert_books_balance(server.dsn)
