"""What a replayed, reversed or downgraded online request must not be able to do.

Each test here is a hole a review found (2026-12-02): a load credited twice
for one top-up on the chip, a reversed load's MAC2 handed out on retry, a
purchase signed with an older key version's keys for a card issued under a
newer one. The money is checked in the books, not only in the replies.
"""

from __future__ import annotations

import grpc

from onecard.clients.card import PendingLoad, SimulatedCard
from onecard.clients.terminal import Terminal, now_bcd_text
from onecard.ledger.keys import MemoryKeyStore
from onecard.ledger.model import Debit, Load, PaymentChannel
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, terminal_pb2
from tests.desk_support import terminal_stub
from tests.support import assert_books_balance, fetch, issue, issuer_key

APPROVED = common_pb2.TXN_STATUS_APPROVED
TOPUP, BUS = "310400000009", "310400000001"
#: One terminal time for a load's request and the chip's check of its MAC2,
#: which covers it: two clock readings a second apart made the test flaky.
WHEN = "20261202090000"


def load_request(
    channel: grpc.aio.Channel, card: SimulatedCard, pending: PendingLoad, seq: int
) -> terminal_pb2.LoadRequest:
    """The request of a load the card began, from the machine it began it at."""
    return Terminal(channel, pending.terminal_id).load_request(
        card, pending, seq=seq, date_time=WHEN
    )


def reverse_request(
    card: SimulatedCard, amount: int, terminal: str, seq: int, original: int
) -> terminal_pb2.ReverseRequest:
    return terminal_pb2.ReverseRequest(
        card_number=card.card_no,
        amount=amount,
        terminal_id=terminal,
        terminal_seq=seq,
        original_seq=original,
        date_time=now_bcd_text(),
    )


async def purse(dsn: str, card: SimulatedCard) -> tuple[int, int]:
    rows = await fetch(
        dsn,
        "SELECT purse_balance, online_counter FROM cards WHERE card_no = $1",
        int(card.card_no),
    )
    return rows[0]["purse_balance"], rows[0]["online_counter"]


async def test_a_load_sent_again_under_a_new_seq_is_not_credited_twice(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await issue(channel, keys)
    stub = terminal_stub(channel)
    pending = card.begin_load(5000, TOPUP)
    first = await stub.Load(load_request(channel, card, pending, 1))
    assert first.status == APPROVED
    card.finish_load(pending, WHEN, first.mac2)  # the chip: 5000, counter 1

    replay = await stub.Load(load_request(channel, card, pending, 2))  # same MAC1, new seq
    assert replay.status == common_pb2.TXN_STATUS_STALE_COUNTER
    assert not replay.mac2
    assert "online counter 0" in replay.detail
    assert await purse(server.dsn, card) == (5000, 1)
    assert card.balance == 5000

    # The card's next load, with its next counter, goes through as usual.
    assert (await Terminal(channel, TOPUP, 3).load(card, 1000)).status == APPROVED
    assert await purse(server.dsn, card) == (6000, 2)
    await assert_books_balance(server.dsn)


async def test_two_loads_with_one_counter_in_one_batch_post_once(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await issue(channel, keys)
    pending = card.begin_load(5000, TOPUP)
    when = now_bcd_text()
    loads = [
        Load(card.card_no, 5000, 0x02, TOPUP, seq, when, card.key_version, pending.random,
             pending.online_counter, pending.old_balance, pending.mac1, PaymentChannel.CASH)
        for seq in (11, 12)
    ]  # fmt: skip
    replies = await server.ledger.create_loads(loads)
    assert [r.status.name for r in replies] == ["APPROVED", "STALE_COUNTER"]
    assert await purse(server.dsn, card) == (5000, 1)
    await assert_books_balance(server.dsn)


async def test_a_card_whose_load_never_completed_can_load_again(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """MAC2 lost and no reversal: the chip stays at its counter and must not be locked out.

    The first cut of the replay check refused every load below the card's
    next counter, so such a card could never be topped up again. The card's
    retry comes with a fresh random; only the old MAC1 is refused.
    """
    card = await issue(channel, keys)
    stub = terminal_stub(channel)
    lost = card.begin_load(3000, TOPUP)
    assert (await stub.Load(load_request(channel, card, lost, 1))).status == APPROVED
    # The MAC2 never reaches the chip, and the terminal goes on to other work.

    retry = card.begin_load(3000, TOPUP)
    assert retry.online_counter == lost.online_counter == 0
    reply = await stub.Load(load_request(channel, card, retry, 2))
    assert reply.status == APPROVED, reply
    card.finish_load(retry, WHEN, reply.mac2)
    assert card.balance == 3000
    # The holder paid twice and holds 3000 on the chip: the ledger owes the
    # rest, and shows it (the desk refunds it on the chip's evidence).
    assert await purse(server.dsn, card) == (6000, 1)

    replayed = await stub.Load(load_request(channel, card, lost, 3))  # the first MAC1 again
    assert replayed.status == common_pb2.TXN_STATUS_STALE_COUNTER and not replayed.mac2
    again = await stub.Load(load_request(channel, card, retry, 4))  # the second one again
    assert again.status == common_pb2.TXN_STATUS_STALE_COUNTER
    assert await purse(server.dsn, card) == (6000, 1)

    # The chip moved on to counter 1; counter 0 can no longer be a genuine card's.
    assert (await Terminal(channel, TOPUP, 5).load(card, 500)).status == APPROVED
    behind = SimulatedCard(card.card_no, issuer_key(keys, 1))  # a chip image at counter 0
    old = behind.begin_load(500, TOPUP)
    stale = await stub.Load(load_request(channel, behind, old, 6))
    assert stale.status == common_pb2.TXN_STATUS_STALE_COUNTER
    assert await purse(server.dsn, card) == (6500, 2)
    await assert_books_balance(server.dsn)


async def test_a_reversed_load_retried_gets_no_mac2_and_the_counter_comes_back(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await issue(channel, keys)
    stub = terminal_stub(channel)
    pending = card.begin_load(5000, TOPUP)
    request = load_request(channel, card, pending, 41)
    assert (await stub.Load(request)).status == APPROVED  # the reply never reaches the terminal
    reversal = await stub.Reverse(reverse_request(card, 5000, TOPUP, 42, 41))
    assert reversal.status == APPROVED and reversal.balance_after == 0

    retry = await stub.Load(request)  # the gateway's idempotent retry of seq 41
    assert retry.status == common_pb2.TXN_STATUS_ALREADY_REVERSED
    assert retry.original_status == APPROVED
    assert not retry.mac2  # with it the chip would credit itself 5000 the ledger took back
    assert retry.balance_after == 0
    assert "reversed by seq 42" in retry.detail
    assert await purse(server.dsn, card) == (0, 0)

    # The chip never completed the load, so it tries the same counter again.
    again = card.begin_load(5000, TOPUP)
    assert again.online_counter == 0
    reply = await stub.Load(load_request(channel, card, again, 43))
    assert reply.status == APPROVED, reply
    card.finish_load(again, WHEN, reply.mac2)
    assert card.balance == 5000
    assert await purse(server.dsn, card) == (5000, 1)
    await assert_books_balance(server.dsn)


async def test_a_reversed_load_does_not_give_back_a_counter_a_later_load_moved_past(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """The counter comes back only while the reversed load's was the card's last:
    after a later load the chip is past it, and a chip image behind it stays stale."""
    card = await issue(channel, keys)
    stub = terminal_stub(channel)
    first = card.begin_load(3000, TOPUP)
    reply = await stub.Load(load_request(channel, card, first, 61))
    assert reply.status == APPROVED
    card.finish_load(first, WHEN, reply.mac2)
    behind = SimulatedCard(card.card_no, issuer_key(keys, 1))  # a chip image at counter 0
    other = "310400000004"  # another machine, another load at the next counter
    second = card.begin_load(1000, other)
    assert second.online_counter == 1
    reply = await stub.Load(load_request(channel, card, second, 7))
    assert reply.status == APPROVED
    card.finish_load(second, WHEN, reply.mac2)
    assert await purse(server.dsn, card) == (4000, 2)

    reversal = await stub.Reverse(reverse_request(card, 3000, TOPUP, 62, 61))
    assert reversal.status == APPROVED and reversal.balance_after == 1000
    assert await purse(server.dsn, card) == (1000, 2)  # the chip is at counter 2 still
    stale = await stub.Load(load_request(channel, behind, behind.begin_load(500, TOPUP), 63))
    assert stale.status == common_pb2.TXN_STATUS_STALE_COUNTER and not stale.mac2
    assert await purse(server.dsn, card) == (1000, 2)
    await assert_books_balance(server.dsn)


async def test_a_reversed_debit_retried_is_not_reported_approved(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await issue(channel, keys)
    assert (await Terminal(channel, TOPUP, 1).load(card, 1000)).status == APPROVED
    bus = Terminal(channel, BUS, 70)
    debit = bus.debit_request(card, 300)
    stub = terminal_stub(channel)
    assert (await stub.Debit(debit)).status == APPROVED
    reversal = await stub.Reverse(reverse_request(card, 300, BUS, 71, 70))
    assert reversal.status == APPROVED
    retry = await stub.Debit(debit)
    assert retry.status == common_pb2.TXN_STATUS_ALREADY_REVERSED
    assert retry.balance_after == 1000
    assert await purse(server.dsn, card) == (1000, 1)
    await assert_books_balance(server.dsn)


async def test_a_purchase_signed_under_another_key_version_than_the_card_s_is_refused(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await issue(channel, keys, kv=3)  # issued under the AES version
    assert (await Terminal(channel, TOPUP, 1).load(card, 5000)).status == APPROVED
    # Someone holding the keys of the old 3DES version signs for this card number.
    forger = SimulatedCard(card.card_no, issuer_key(keys, 1))
    forger.balance, forger.online_counter = 5000, 1  # what the genuine chip would say
    forged = Terminal(channel, BUS, 80).debit_request(forger, 100)
    assert forged.key_version == 1
    reply = await terminal_stub(channel).Debit(forged)
    assert reply.status == common_pb2.TXN_STATUS_MAC_INVALID
    assert "card's key version" in reply.detail
    assert reply.balance_after == 0  # told nothing about the card
    assert await purse(server.dsn, card) == (5000, 1)
    rows = await fetch(server.dsn, "SELECT 1 FROM terminal_txns WHERE terminal_id = $1", int(BUS))
    assert rows == []  # it claims no (terminal, seq): the genuine seq 80 may still come

    # A load's MAC1 under the old version likewise.
    pending = forger.begin_load(1000, TOPUP)
    request = load_request(channel, forger, pending, 81)
    load = await terminal_stub(channel).Load(request)
    assert load.status == common_pb2.TXN_STATUS_MAC_INVALID and not load.mac2
    assert await purse(server.dsn, card) == (5000, 1)
    await assert_books_balance(server.dsn)


async def test_a_refused_load_sent_again_under_a_new_seq_is_not_credited(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A refused load's cash goes back and its chip stays as it was; its MAC1 was
    still good for a credit under a new seq once the card was active again (review)."""
    card = await issue(channel, keys)
    stub = terminal_stub(channel)
    await fetch(server.dsn, "UPDATE cards SET status = 2 WHERE card_no = $1", int(card.card_no))
    refused = card.begin_load(5000, TOPUP)
    first = await stub.Load(load_request(channel, card, refused, 1))
    assert first.status == common_pb2.TXN_STATUS_CARD_NOT_ACTIVE
    await fetch(server.dsn, "UPDATE cards SET status = 1 WHERE card_no = $1", int(card.card_no))

    # The card's own top-up: the same counter, a fresh random.
    ok = card.begin_load(5000, TOPUP)
    reply = await stub.Load(load_request(channel, card, ok, 2))
    assert reply.status == APPROVED
    card.finish_load(ok, WHEN, reply.mac2)

    replay = await stub.Load(load_request(channel, card, refused, 3))
    assert replay.status == common_pb2.TXN_STATUS_STALE_COUNTER
    assert not replay.mac2
    assert card.balance == 5000 and await purse(server.dsn, card) == (5000, 1)
    await assert_books_balance(server.dsn)


async def test_a_load_refused_in_a_batch_is_spent_for_the_rest_of_it(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """A refused load's MAC1 sent again under another seq in the same batch is
    answered as in any later batch (STALE_COUNTER), whatever ran between them."""
    card = await issue(channel, keys)
    await Terminal(channel, TOPUP).load(card, 95_000)
    bus = Terminal(channel, BUS)
    pending = card.begin_load(10_000, TOPUP)
    when = now_bcd_text()

    def load(seq: int) -> Load:
        return Load(card.card_no, 10_000, 0x02, TOPUP, seq, when, card.key_version,
                    pending.random, pending.online_counter, pending.old_balance, pending.mac1,
                    PaymentChannel.CASH)  # fmt: skip

    signed = bus.debit_request(card, 20_000)
    fare = Debit(signed.card_number, signed.amount, signed.transaction_type, signed.terminal_id,
                 signed.terminal_seq, signed.date_time, signed.key_version, signed.tac)  # fmt: skip
    replies = await server.ledger.create_terminal_txns([load(21), fare, load(22)])
    assert [r.status.name for r in replies] == ["OVER_LIMIT", "APPROVED", "STALE_COUNTER"]
    assert (await purse(server.dsn, card))[0] == 95_000 - 20_000
    await assert_books_balance(server.dsn)
