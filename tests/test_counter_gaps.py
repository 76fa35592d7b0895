"""Counter gaps in uploaded records, around online purchases the chip counted too.

An online debit carries no chip counter, so the ledger cannot place it among
the card's offline counters. It used to guess the next one, and finance got
a COUNTER_GAP for a ride that was never missing whenever the debit landed
while earlier records were still on a bus, or when the card's first
purchase seen was online. A real gap must still be found.
"""

from __future__ import annotations

import grpc

from onecard.clients.card import SimulatedCard
from onecard.clients.gateway import Gateway, make_batch
from onecard.clients.terminal import Terminal
from onecard.ledger.keys import MemoryKeyStore
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, upload_pb2
from tests.desk_support import get_card
from tests.support import assert_books_balance, fetch
from tests.test_upload_api import POSTED, WITH_EXCEPTION, funded, ride

GATE = "310400000001"  # a bus terminal that also asks online; its own seqs
GAP = upload_pb2.RECORD_EXCEPTION_COUNTER_GAP
MISMATCH = upload_pb2.RECORD_EXCEPTION_BALANCE_MISMATCH


async def debit_at_gate(channel: grpc.aio.Channel, card: SimulatedCard, seq: int) -> None:
    reply = await Terminal(channel, GATE, 800_000 + seq).debit(card, 100)
    assert reply.status == common_pb2.TXN_STATUS_APPROVED


async def gap_details(dsn: str, card: SimulatedCard) -> list[str]:
    rows = await fetch(
        dsn,
        "SELECT detail FROM finance_exceptions WHERE card_no = $1 AND kind = $2 "
        "ORDER BY terminal_seq",
        int(card.card_no),
        int(GAP),
    )
    return [r["detail"] for r in rows]


async def test_a_debit_landing_while_rides_are_on_a_bus_is_no_gap(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    gateway = Gateway(channel)
    (first,) = await gateway.upload([make_batch("g1", [ride(card, 200)])])  # counter 1
    on_bus = ride(card, 200)  # counter 2, still on the bus
    await debit_at_gate(channel, card, 10)  # the chip counts it: 3
    after = ride(card, 200)  # counter 4
    (late,) = await gateway.upload([make_batch("g2", [on_bus])])
    (next_,) = await gateway.upload([make_batch("g3", [after])])

    assert first.results[0].outcome == POSTED
    # The bus's record is late: the chip reported the balance before the debit.
    assert list(late.results[0].exceptions) == [MISMATCH]
    # Counter 4 after 2: the missing 3 is the online debit, not a lost ride.
    assert next_.results[0].outcome == POSTED, next_.results[0]
    assert await gap_details(server.dsn, card) == []
    await assert_books_balance(server.dsn)


async def test_a_card_first_seen_online_gets_no_gap_on_its_first_rides(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    card.offline_counter = 41  # in the field before the ledger saw any purchase of it
    await debit_at_gate(channel, card, 20)  # 42
    await debit_at_gate(channel, card, 21)  # 43
    rides = [ride(card, 100), ride(card, 100)]  # 44, 45
    (reply,) = await Gateway(channel).upload([make_batch("n1", rides)])
    assert [r.outcome for r in reply.results] == [POSTED, POSTED]
    assert await gap_details(server.dsn, card) == []
    await assert_books_balance(server.dsn)


async def test_a_gap_online_purchases_cannot_explain_is_still_reported(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    gateway = Gateway(channel)
    await gateway.upload([make_batch("r1", [ride(card, 100)])])  # counter 1
    await debit_at_gate(channel, card, 30)  # 2
    lost = ride(card, 100)  # 3: this record never reaches the ledger
    after = ride(card, 100)  # 4
    (reply,) = await gateway.upload([make_batch("r2", [after])])
    assert reply.results[0].outcome == WITH_EXCEPTION
    assert GAP in reply.results[0].exceptions
    assert await gap_details(server.dsn, card) == [
        "counter 4 after 1: 1 missing so far (1 more taken by online purchases)"
    ]
    # The online purchase is spent on that gap: the next gap is a gap in full.
    card.offline_counter += 2
    (again,) = await gateway.upload([make_batch("r3", [ride(card, 100)])])
    assert GAP in again.results[0].exceptions
    assert (await gap_details(server.dsn, card))[-1] == "counter 7 after 4: 2 missing so far"
    # The lost record, uploaded at last, fills its slot and posts.
    (found,) = await gateway.upload([make_batch("r4", [lost])])
    assert GAP not in found.results[0].exceptions
    await assert_books_balance(server.dsn)


async def test_the_desk_shows_the_purchases_the_ledger_knows_of(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    await Gateway(channel).upload([make_batch("v1", [ride(card, 100), ride(card, 100)])])
    await debit_at_gate(channel, card, 40)
    view = await get_card(channel, card.card_no)
    assert view.offline_counter == card.offline_counter == 3
