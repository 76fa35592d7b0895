"""Debit and Load over real gRPC and real PostgreSQL: every outcome, in replies and books."""

from __future__ import annotations

import asyncio
from typing import TypedDict

import grpc
import pytest

from onecard.clients.card import SimulatedCard
from onecard.clients.terminal import Terminal
from onecard.ledger.accounts import purse_account
from onecard.ledger.keys import MemoryKeyStore
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, terminal_pb2
from tests.support import assert_books_balance, fetch, issue, issuer_key

APPROVED = common_pb2.TXN_STATUS_APPROVED
DT = "20261122083015"


async def funded(
    channel: grpc.aio.Channel, keys: MemoryKeyStore, amount: int = 5000, kv: int = 1
) -> SimulatedCard:
    card = await issue(channel, keys, kv=kv)
    reply = await Terminal(channel, "310400000009", 1000 + kv).load(card, amount)
    assert reply.status == APPROVED
    return card


@pytest.mark.parametrize("kv", [1, 2, 3], ids=["pboc-3des", "sm4", "aes"])
async def test_load_then_debit_every_suite(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore, kv: int
) -> None:
    card = await issue(channel, keys, kv=kv)
    topup = Terminal(channel, "310400000009", 10 * kv)
    load = await topup.load(card, 5000, common_pb2.PAYMENT_CHANNEL_ALIPAY)
    assert load.status == APPROVED
    assert load.balance_after == 5000
    assert len(load.mac2) == (8 if kv == 3 else 4)
    assert card.balance == 5000  # the chip accepted MAC2 and credited itself

    bus = Terminal(channel, "310400000001", 100 * kv)
    debit = await bus.debit(card, 200)
    assert debit.status == APPROVED
    assert debit.balance_after == 4800

    rows = await fetch(
        server.dsn,
        "SELECT purse_balance, online_counter FROM cards WHERE card_no = $1",
        int(card.card_no),
    )
    assert rows[0]["purse_balance"] == 4800
    assert rows[0]["online_counter"] == 1
    postings = await fetch(
        server.dsn,
        "SELECT kind, amount, debit_account, credit_account "
        "FROM postings WHERE card_no = $1 ORDER BY posting_id",
        int(card.card_no),
    )
    purse = purse_account(int(card.card_no))
    assert [(p["kind"], p["amount"]) for p in postings] == [(3, 2000), (2, 5000), (1, 200)]
    assert postings[1]["credit_account"] == purse
    assert postings[2]["debit_account"] == purse
    await assert_books_balance(server.dsn)


async def test_a_load_is_taken_into_the_cash_of_its_payment_channel(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """Finance settles each channel on its own (the cash drawer, Alipay, the bank)."""
    card = await issue(channel, keys)  # its deposit came in cash
    topup = Terminal(channel, "310400000009", 30)
    for amount, paid_by in (
        (1000, common_pb2.PAYMENT_CHANNEL_ALIPAY),
        (300, common_pb2.PAYMENT_CHANNEL_WECHAT_PAY),
        (50, common_pb2.PAYMENT_CHANNEL_BANK_CARD),
        (7, common_pb2.PAYMENT_CHANNEL_CASH),
    ):
        assert (await topup.load(card, amount, paid_by)).status == APPROVED
    rows = await fetch(
        server.dsn, "SELECT code, balance FROM account_balances WHERE code LIKE 'cash:3104:%'"
    )
    assert {r["code"]: r["balance"] for r in rows if r["balance"]} == {
        "cash:3104:alipay": -1000,
        "cash:3104:wechat_pay": -300,
        "cash:3104:bank_card": -50,
        "cash:3104:cash": -2007,
    }
    await assert_books_balance(server.dsn)


async def test_insufficient_funds_posts_nothing(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 300)
    bus = Terminal(channel, "310400000001", 1)
    reply = await bus.debit(card, 200)
    assert reply.status == APPROVED
    card.balance += 1000  # the chip may believe anything; the ledger decides
    reply = await bus.debit(card, 200)
    assert reply.status == common_pb2.TXN_STATUS_INSUFFICIENT_FUNDS
    assert reply.balance_after == 100
    assert "balance 100" in reply.detail
    rows = await fetch(
        server.dsn, "SELECT purse_balance FROM cards WHERE card_no = $1", int(card.card_no)
    )
    assert rows[0]["purse_balance"] == 100
    assert (
        len(
            await fetch(
                server.dsn,
                "SELECT 1 FROM postings WHERE card_no = $1 AND kind = 1",
                int(card.card_no),
            )
        )
        == 1
    )
    await assert_books_balance(server.dsn)


async def test_unknown_card(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    ghost = SimulatedCard("3104999999999999", issuer_key(keys, 1), balance=1000)
    reply = await Terminal(channel, "310400000001", 1).debit(ghost, 100)
    assert reply.status == common_pb2.TXN_STATUS_UNKNOWN_CARD
    assert await fetch(server.dsn, "SELECT 1 FROM postings WHERE card_no = 3104999999999999") == []


async def test_card_not_active(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    conn_rows = await fetch(
        server.dsn,
        "UPDATE cards SET status = 2 WHERE card_no = $1 RETURNING card_no",
        int(card.card_no),
    )
    assert conn_rows
    reply = await Terminal(channel, "310400000001", 1).debit(card, 100)
    assert reply.status == common_pb2.TXN_STATUS_CARD_NOT_ACTIVE
    assert reply.balance_after == 5000
    load = await Terminal(channel, "310400000009", 77).load(card, 100)
    assert load.status == common_pb2.TXN_STATUS_CARD_NOT_ACTIVE
    assert load.mac2 == b""
    await assert_books_balance(server.dsn)


async def test_bad_tac_is_refused_and_the_genuine_request_still_posts(
    server: RunningServer,
    channel: grpc.aio.Channel,
    keys: MemoryKeyStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    card = await funded(channel, keys)
    bus = Terminal(channel, "310400000001", 1)
    genuine = bus.debit_request(card, 100)
    damaged = terminal_pb2.DebitRequest()
    damaged.CopyFrom(genuine)
    damaged.tac = bytes([genuine.tac[0] ^ 1]) + genuine.tac[1:]  # one bit flipped on the way
    reply = await bus.stub.Debit(damaged)
    assert reply.status == common_pb2.TXN_STATUS_MAC_INVALID
    assert reply.balance_after == 0  # an unauthenticated request learns no balance
    rows = await fetch(
        server.dsn, "SELECT purse_balance FROM cards WHERE card_no = $1", int(card.card_no)
    )
    assert rows[0]["purse_balance"] == 5000
    claimed = await fetch(
        server.dsn,
        "SELECT status FROM terminal_txns WHERE terminal_id = $1 AND terminal_seq = $2",
        310400000001,
        genuine.terminal_seq,
    )
    assert claimed == []  # the damaged copy did not take the (terminal, seq)
    assert "TAC does not verify" in caplog.text
    again = await bus.stub.Debit(genuine)  # the terminal sends it again, intact
    assert again.status == common_pb2.TXN_STATUS_APPROVED
    assert again.balance_after == 4900
    await assert_books_balance(server.dsn)


async def test_tampered_amount_fails_tac(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    bus = Terminal(channel, "310400000001", 1)
    req = bus.debit_request(card, 100)
    req.amount = 1  # a terminal that charges less than the card signed
    reply = await bus.stub.Debit(req)
    assert reply.status == common_pb2.TXN_STATUS_MAC_INVALID


async def test_bad_mac1_posts_nothing(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await issue(channel, keys, kv=2)
    topup = Terminal(channel, "310400000009", 5)
    pending = card.begin_load(1000, topup.terminal_id)
    reply = await topup.stub.Load(
        terminal_pb2.LoadRequest(
            card_number=card.card_no,
            amount=1000,
            transaction_type=0x02,
            terminal_id=topup.terminal_id,
            terminal_seq=5,
            date_time=DT,
            key_version=2,
            card_random=pending.random,
            online_counter=pending.online_counter,
            old_balance=pending.old_balance + 1,
            mac1=pending.mac1,
            payment_channel=common_pb2.PAYMENT_CHANNEL_CASH,
        )
    )
    assert reply.status == common_pb2.TXN_STATUS_MAC_INVALID
    assert reply.mac2 == b""
    assert (
        await fetch(
            server.dsn, "SELECT 1 FROM postings WHERE card_no = $1 AND kind = 2", int(card.card_no)
        )
        == []
    )
    await assert_books_balance(server.dsn)


async def test_over_limit(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 100_000)  # standard purse maximum
    reply = await Terminal(channel, "310400000001", 1).debit(card, 50_001)
    assert reply.status == common_pb2.TXN_STATUS_OVER_LIMIT
    assert "50000" in reply.detail
    load = await Terminal(channel, "310400000009", 9).load(card, 1)
    assert load.status == common_pb2.TXN_STATUS_OVER_LIMIT
    assert load.balance_after == 100_000
    await assert_books_balance(server.dsn)


async def test_a_load_the_chip_could_not_hold_is_over_limit(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    """The chip shows more than the ledger (a purchase posted that the chip never
    completed): the load must fit on the chip as well as in the ledger's purse."""
    card = await funded(channel, keys, 5000)
    card.balance = 99_900  # what the chip reports as its balance before the load
    load = await Terminal(channel, "310400000009", 9).load(card, 200)
    assert load.status == common_pb2.TXN_STATUS_OVER_LIMIT
    assert "100100" in load.detail and "100000" in load.detail
    assert load.balance_after == 5000 and not load.mac2
    assert card.balance == 99_900  # no MAC2: the chip was not credited
    loads = await fetch(
        server.dsn, "SELECT amount FROM postings WHERE card_no = $1 AND kind = 2", int(card.card_no)
    )
    assert [r["amount"] for r in loads] == [5000]
    await assert_books_balance(server.dsn)


async def test_unknown_terminal(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    reply = await Terminal(channel, "999900000001", 1).debit(card, 100)
    assert reply.status == common_pb2.TXN_STATUS_UNKNOWN_TERMINAL


async def test_retry_is_posted_once_and_changed_retry_conflicts(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys)
    bus = Terminal(channel, "310400000001", 1)
    req = bus.debit_request(card, 250)
    first = await bus.stub.Debit(req)
    second = await bus.stub.Debit(req)
    assert first.status == APPROVED
    assert second.status == common_pb2.TXN_STATUS_DUPLICATE
    assert second.original_status == APPROVED
    assert second.balance_after == first.balance_after == 4750

    changed = terminal_pb2.DebitRequest()
    changed.CopyFrom(req)
    changed.amount = 260
    changed.tac = card.sign_purchase(260, bus.terminal_id, req.terminal_seq, req.date_time)
    third = await bus.stub.Debit(changed)
    assert third.status == common_pb2.TXN_STATUS_CONFLICT
    rows = await fetch(
        server.dsn,
        "SELECT amount FROM postings WHERE terminal_id = $1 AND terminal_seq = $2",
        310400000001,
        req.terminal_seq,
    )
    assert [r["amount"] for r in rows] == [250]
    balance = await fetch(
        server.dsn, "SELECT purse_balance FROM cards WHERE card_no = $1", int(card.card_no)
    )
    assert balance[0]["purse_balance"] == 4750
    await assert_books_balance(server.dsn)


async def test_load_retry_returns_same_mac2(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await issue(channel, keys, kv=3)
    topup = Terminal(channel, "310400000009", 40)
    pending = card.begin_load(700, topup.terminal_id)
    req = terminal_pb2.LoadRequest(
        card_number=card.card_no,
        amount=700,
        transaction_type=0x02,
        terminal_id=topup.terminal_id,
        terminal_seq=40,
        date_time=DT,
        key_version=3,
        card_random=pending.random,
        online_counter=pending.online_counter,
        old_balance=pending.old_balance,
        mac1=pending.mac1,
        payment_channel=common_pb2.PAYMENT_CHANNEL_BANK_CARD,
    )
    first = await topup.stub.Load(req)
    again = await topup.stub.Load(req)
    assert first.status == APPROVED
    assert again.status == common_pb2.TXN_STATUS_DUPLICATE
    assert again.mac2 == first.mac2
    card.finish_load(pending, DT, again.mac2)  # the card accepts the replayed MAC2
    assert card.balance == 700
    rows = await fetch(
        server.dsn, "SELECT purse_balance FROM cards WHERE card_no = $1", int(card.card_no)
    )
    assert rows[0]["purse_balance"] == 700


async def test_fifty_concurrent_debits_funds_for_thirty(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await funded(channel, keys, 3000)
    terminals = [Terminal(channel, f"31040000000{i}", 500) for i in range(1, 6)]
    requests = []
    for n in range(50):
        t = terminals[n % 5]
        card.balance = 10_000  # each chip tap is independent here; only the ledger counts
        requests.append((t, t.debit_request(card, 100)))
    replies = await asyncio.gather(*(t.stub.Debit(r) for t, r in requests))
    statuses = [r.status for r in replies]
    assert statuses.count(APPROVED) == 30
    assert statuses.count(common_pb2.TXN_STATUS_INSUFFICIENT_FUNDS) == 20
    assert min(r.balance_after for r in replies) == 0
    rows = await fetch(
        server.dsn, "SELECT purse_balance FROM cards WHERE card_no = $1", int(card.card_no)
    )
    assert rows[0]["purse_balance"] == 0
    posted = await fetch(
        server.dsn,
        "SELECT count(*) AS n FROM postings WHERE card_no = $1 AND kind = 1",
        int(card.card_no),
    )
    assert posted[0]["n"] == 30
    await assert_books_balance(server.dsn)


BAD_DEBITS = [
    ("card_number", {"card_number": "31041234"}, "16 decimal digits"),
    ("card_number", {"card_number": "310412345678901X"}, "16 decimal digits"),
    ("card_number", {"card_number": "9999123456789012"}, "issuer code 9999"),
    ("terminal_id", {"terminal_id": "12345"}, "12 decimal digits"),
    ("amount", {"amount": 0}, "positive"),
    ("amount", {"amount": 1_000_001}, "system limit of 1000000"),
    ("date_time", {"date_time": "20260230083015"}, "not a real date"),
    ("date_time", {"date_time": "2026112208"}, "14 decimal digits"),
    ("tac", {"tac": b"\x01\x02\x03"}, "must be 4 bytes"),
    ("key_version", {"key_version": 9}, "unknown key version 9"),
    ("transaction_type", {"transaction_type": 0x02}, "0x06 or 0x09"),
]


@pytest.mark.parametrize(
    ("field", "change", "rule"), BAD_DEBITS, ids=[f"{f}-{r}" for f, _, r in BAD_DEBITS]
)
async def test_bad_debit_fields_are_invalid_argument(
    server: RunningServer,
    channel: grpc.aio.Channel,
    keys: MemoryKeyStore,
    field: str,
    change: dict[str, object],
    rule: str,
) -> None:
    card = await funded(channel, keys)
    bus = Terminal(channel, "310400000001", 1)
    req = bus.debit_request(card, 100)
    for k, v in change.items():
        setattr(req, k, v)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await bus.stub.Debit(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert details is not None
    assert details.startswith(field)
    assert rule in details
    assert (
        await fetch(
            server.dsn,
            "SELECT 1 FROM terminal_txns WHERE terminal_seq = $1 AND terminal_id = 310400000001",
            req.terminal_seq,
        )
        == []
    )
    await assert_books_balance(server.dsn)


class _LoadFields(TypedDict, total=False):
    """LoadRequest's fields, as keyword arguments."""

    card_number: str
    amount: int
    transaction_type: int
    terminal_id: str
    terminal_seq: int
    date_time: str
    key_version: int
    card_random: bytes
    online_counter: int
    old_balance: int
    mac1: bytes
    payment_channel: common_pb2.PaymentChannel


async def test_bad_load_fields_are_invalid_argument(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await issue(channel, keys)
    pending = card.begin_load(100, "310400000009")
    base = _LoadFields(
        card_number=card.card_no,
        amount=100,
        transaction_type=0x02,
        terminal_id="310400000009",
        terminal_seq=3,
        date_time=DT,
        key_version=1,
        card_random=pending.random,
        online_counter=0,
        old_balance=0,
        mac1=pending.mac1,
        payment_channel=common_pb2.PAYMENT_CHANNEL_CASH,
    )
    cases: list[tuple[str, _LoadFields]] = [
        ("card_random", {"card_random": b"\x01"}),
        ("mac1", {"mac1": b"\x00" * 8}),
        ("payment_channel", {"payment_channel": common_pb2.PAYMENT_CHANNEL_UNSPECIFIED}),
        ("online_counter", {"online_counter": 70000}),
    ]
    stub = Terminal(channel, "310400000009").stub
    for field, change in cases:
        fields: _LoadFields = {**base, **change}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Load(terminal_pb2.LoadRequest(**fields))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details()
        assert details is not None
        assert details.startswith(field), details
    assert (
        await fetch(server.dsn, "SELECT 1 FROM terminal_txns WHERE card_no = $1", int(card.card_no))
        == []
    )
