"""Counter gaps in uploaded records, around online purchases the chip counted too.

An online debit carries no chip counter, so the ledger cannot place it among
the card's offline counters by number. It used to guess the next one, then
to keep a count of debits spent on the next gap: finance got a COUNTER_GAP
for a ride that was never missing when a debit landed while earlier records
were still on a bus, and a lost record could go unreported. A gap is now
put down to the online debits dated between the card's highest record and
the new one. Every event here carries its own time, a minute apart.
"""

from __future__ import annotations

import datetime as dt
import itertools

import grpc

from onecard.clients.card import SimulatedCard
from onecard.clients.gateway import Gateway, make_batch
from onecard.clients.terminal import CHINA_TIME, Terminal
from onecard.ledger.keys import MemoryKeyStore
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, terminal_pb2, upload_pb2
from tests.desk_support import get_card, terminal_stub
from tests.support import assert_books_balance, fetch
from tests.test_upload_api import POSTED, WITH_EXCEPTION, funded, ride

GATE = "310400000001"  # a bus terminal that also asks online; its own seqs
GAP = upload_pb2.RECORD_EXCEPTION_COUNTER_GAP
MISMATCH = upload_pb2.RECORD_EXCEPTION_BALANCE_MISMATCH
_minutes = itertools.count()
_START = dt.datetime.now(CHINA_TIME).replace(tzinfo=None) - dt.timedelta(days=1)


def at() -> str:
    """The next event's time: a minute after the one before."""
    return (_START + dt.timedelta(minutes=next(_minutes))).strftime("%Y%m%d%H%M%S")


def ride_at(card: SimulatedCard) -> upload_pb2.OfflineRecord:
    return ride(card, 100, at())


async def debit_at_gate(channel: grpc.aio.Channel, card: SimulatedCard, seq: int) -> None:
    terminal = Terminal(channel, GATE, 800_000 + seq)
    reply = await terminal.stub.Debit(terminal.debit_request(card, 100, date_time=at()))
    assert reply.status == common_pb2.TXN_STATUS_APPROVED


async def ridden_once(
    channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> tuple[SimulatedCard, Gateway]:
    """A funded card whose first ride (counter 1) is uploaded, and the gateway that did it."""
    card = await funded(channel, keys)
    gateway = Gateway(channel)
    (reply,) = await gateway.upload([make_batch(f"first-{card.card_no}", [ride_at(card)])])
    assert reply.results[0].outcome == POSTED
    return card, gateway


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
    (first,) = await gateway.upload([make_batch("g1", [ride_at(card)])])  # counter 1
    on_bus = ride_at(card)  # counter 2, still on the bus
    await debit_at_gate(channel, card, 10)  # the chip counts it: 3
    after = ride_at(card)  # counter 4
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
    rides = [ride_at(card), ride_at(card)]  # 44, 45
    (reply,) = await Gateway(channel).upload([make_batch("n1", rides)])
    assert [r.outcome for r in reply.results] == [POSTED, POSTED]
    assert await gap_details(server.dsn, card) == []
    assert (await get_card(channel, card.card_no)).offline_counter == 45
    await assert_books_balance(server.dsn)


async def test_a_gap_online_debits_cannot_explain_is_still_reported(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card, gateway = await ridden_once(channel, keys)  # counter 1 uploaded
    await debit_at_gate(channel, card, 30)  # 2
    lost = ride_at(card)  # 3: this record has not reached the ledger
    after = ride_at(card)  # 4
    (reply,) = await gateway.upload([make_batch("r2", [after])])
    assert reply.results[0].outcome == WITH_EXCEPTION
    assert GAP in reply.results[0].exceptions
    assert await gap_details(server.dsn, card) == [
        "counter 4 after 1: 1 missing so far (1 more taken by online debits)"
    ]
    # The debit was before counter 4: it explains no later gap.
    card.offline_counter += 2
    (again,) = await gateway.upload([make_batch("r3", [ride_at(card)])])
    assert GAP in again.results[0].exceptions
    assert (await gap_details(server.dsn, card))[-1] == "counter 7 after 4: 2 missing so far"
    # The lost record, uploaded at last, fills its slot and posts.
    (found,) = await gateway.upload([make_batch("r4", [lost])])
    assert GAP not in found.results[0].exceptions
    await assert_books_balance(server.dsn)


async def test_a_lost_record_after_a_late_first_record_is_reported(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A count of unplaced debits (41a3095) let a debit below a late first record hide a gap.

    Chip: online 1, offline 2 (on a bus), online 3, offline 4 (lost), offline 5.
    """
    card = await funded(channel, keys)
    gateway = Gateway(channel)
    await debit_at_gate(channel, card, 40)  # 1
    on_bus = ride_at(card)  # 2
    await debit_at_gate(channel, card, 41)  # 3
    (late,) = await gateway.upload([make_batch("f1", [on_bus])])
    assert GAP not in late.results[0].exceptions  # the card's first record
    assert (await get_card(channel, card.card_no)).offline_counter == 3
    ride_at(card)  # 4: never reaches the ledger
    (reply,) = await gateway.upload([make_batch("f2", [ride_at(card)])])  # 5
    assert GAP in reply.results[0].exceptions
    assert await gap_details(server.dsn, card) == [
        "counter 5 after 2: 1 missing so far (1 more taken by online debits)"
    ]


async def test_a_reversed_debit_still_took_its_counter(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """The chip's counter does not go back when the terminal reverses a debit."""
    card, gateway = await ridden_once(channel, keys)  # counter 1 uploaded
    on_bus = ride_at(card)  # 2
    await debit_at_gate(channel, card, 50)  # 3
    reversal = await terminal_stub(channel).Reverse(
        terminal_pb2.ReverseRequest(
            card_number=card.card_no,
            amount=100,
            terminal_id=GATE,
            terminal_seq=800_051,
            original_seq=800_050,
            date_time=at(),
        )
    )
    assert reversal.status == common_pb2.TXN_STATUS_APPROVED, reversal
    await gateway.upload([make_batch("v2", [on_bus])])
    (next_,) = await gateway.upload([make_batch("v3", [ride_at(card)])])  # 4
    assert GAP not in next_.results[0].exceptions, await gap_details(server.dsn, card)
    await assert_books_balance(server.dsn)


async def test_rides_uploaded_out_of_order_around_a_debit_leave_no_false_gap(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """Chip: 1 uploaded, 2 on bus A, 3 on bus B, online 4, then 5; B uploads before A."""
    card, gateway = await ridden_once(channel, keys)  # counter 1 uploaded
    bus_a, bus_b = ride_at(card), ride_at(card)  # 2, 3
    await debit_at_gate(channel, card, 60)  # 4
    await gateway.upload([make_batch("o2", [bus_b])])
    assert await gap_details(server.dsn, card) == ["counter 3 after 1: 1 missing so far"]
    (a,) = await gateway.upload([make_batch("o3", [bus_a])])  # fills the slot
    assert GAP not in a.results[0].exceptions
    (last,) = await gateway.upload([make_batch("o4", [ride_at(card)])])  # 5
    assert GAP not in last.results[0].exceptions, await gap_details(server.dsn, card)
    await assert_books_balance(server.dsn)


async def test_records_of_one_card_in_one_batch_are_measured_in_order(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A batch holding a card's rides on both sides of a debit, and a lost one."""
    card, gateway = await ridden_once(channel, keys)  # counter 1 uploaded
    second = ride_at(card)  # 2
    await debit_at_gate(channel, card, 70)  # 3
    fourth = ride_at(card)  # 4
    ride_at(card)  # 5: lost
    sixth = ride_at(card)  # 6
    (reply,) = await gateway.upload([make_batch("b2", [second, fourth, sixth])])
    # The second ride is late (the balance from before the debit), the sixth
    # follows a lost ride: only the sixth shows a gap.
    assert [list(r.exceptions) for r in reply.results] == [[MISMATCH], [], [MISMATCH, GAP]]
    assert await gap_details(server.dsn, card) == ["counter 6 after 4: 1 missing so far"]
    await assert_books_balance(server.dsn)


async def test_the_desk_shows_the_purchases_the_ledger_knows_of(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    await Gateway(channel).upload([make_batch("v1", [ride_at(card), ride_at(card)])])
    await debit_at_gate(channel, card, 80)
    view = await get_card(channel, card.card_no)
    assert view.offline_counter == card.offline_counter == 3


async def test_a_first_ride_and_a_gap_after_a_debit_in_one_batch(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """The card's first record and the next one arrive together, a gate debit between them."""
    card = await funded(channel, keys)
    first = ride_at(card)  # 1, on the bus
    await debit_at_gate(channel, card, 90)  # 2
    third = ride_at(card)  # 3, on the same bus
    (reply,) = await Gateway(channel).upload([make_batch("t1", [first, third])])
    assert GAP not in reply.results[1].exceptions, await gap_details(server.dsn, card)
    await assert_books_balance(server.dsn)
