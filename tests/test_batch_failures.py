"""What one item, or one passing failure, must not do to a batch and its callers.

Each test is a hole a review found (2026-12-02): a product another worker
added failed every batch holding that card, with the innocent requests
merged into it; a closing server answered "queue is full"; writers that
kept racing, a deadlock victim, a database restarting after a crash or a
standby promoted under the server answered UNKNOWN, which terminals do not
retry, where every write is idempotent and UNAVAILABLE is the truth.
"""

from __future__ import annotations

import uuid

import asyncpg
import grpc
import pytest

from onecard.clients.card import SimulatedCard
from onecard.clients.terminal import Terminal
from onecard.ledger.crypto.verifier import ReferenceVerifier
from onecard.ledger.engine import Ledger
from onecard.ledger.keys import MemoryKeyStore
from onecard.ledger.model import CardIssue, Debit, DeskStatus, Load, PaymentChannel, TxnResult
from onecard.ledger.storage import Conn, Contention
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, terminal_pb2
from tests.desk_support import terminal_stub
from tests.support import (
    assert_books_balance,
    dev_keys,
    fetch,
    issue,
    issuer_key,
    new_card_number,
    wait_until,
)

APPROVED = common_pb2.TXN_STATUS_APPROVED
TOPUP, BUS = "310400000009", "310400000001"


def as_debit(request: terminal_pb2.DebitRequest) -> Debit:
    return Debit(
        request.card_number,
        request.amount,
        request.transaction_type,
        request.terminal_id,
        request.terminal_seq,
        request.date_time,
        request.key_version,
        request.tac,
    )


async def test_a_product_another_worker_added_does_not_fail_the_batch(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    innocent = await issue(channel, keys)
    assert (await Terminal(channel, TOPUP, 1).load(innocent, 1000)).status == APPROVED

    # Another worker process, started after this server read its reference
    # data, learns of a new product and issues a card of it.
    async with server.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO products VALUES ('tourist', 'Tourist card', 0, 50000, 20000)"
        )
    other_pool = await asyncpg.create_pool(server.dsn, min_size=1, max_size=2)
    other = await Ledger.open(other_pool, dev_keys(), ReferenceVerifier(dev_keys()))
    newcomer = SimulatedCard(new_card_number(), issuer_key(keys, 1))
    try:
        issued = await other.issue_card(
            CardIssue(str(uuid.uuid4()), "staff-1", newcomer.card_no, "tourist", 0, 1,
                      PaymentChannel.CASH)
        )  # fmt: skip
        assert issued.status is DeskStatus.OK, issued
    finally:
        await other.close()
        await other_pool.close()
    # This server hears of the product (the reference data watch); a batch
    # can still meet it first, the notification on its way: as if unheard.
    await wait_until(lambda: "tourist" in server.ledger.ref.products)
    del server.ledger.ref.products["tourist"]

    bus = Terminal(channel, BUS, 10)
    debits = [as_debit(bus.debit_request(innocent, 100))]
    newcomer.balance = 500  # the chip may believe anything; the ledger decides
    debits.append(as_debit(bus.debit_request(newcomer, 100)))
    results = await server.ledger.create_debits(debits)  # one batch, as the committer forms it
    assert [r.status.name for r in results] == ["APPROVED", "INSUFFICIENT_FUNDS"]
    assert "tourist" in server.ledger.ref.products
    rows = await fetch(
        server.dsn, "SELECT purse_balance FROM cards WHERE card_no = $1", int(innocent.card_no)
    )
    assert rows[0]["purse_balance"] == 900
    await assert_books_balance(server.dsn)


async def test_a_closing_server_answers_unavailable_not_overloaded(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore
) -> None:
    card = await issue(channel, keys)
    card.balance = 100  # the chip may believe anything; the call must not get that far
    await server.ledger.committer.close()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await terminal_stub(channel).Debit(Terminal(channel, BUS, 1).debit_request(card, 1))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (err.value.details() or "")


@pytest.mark.parametrize(
    "failure",
    [
        Contention("batch kept racing concurrent writers; retry"),
        asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
        asyncpg.exceptions.SerializationError("could not serialize access"),
        asyncpg.exceptions.CrashShutdownError("the database system is in recovery mode"),
        asyncpg.exceptions.ReadOnlySQLTransactionError("read-only transaction"),
        asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_a_failure_a_retry_may_cure_answers_unavailable(
    server: RunningServer, channel: grpc.aio.Channel, keys: MemoryKeyStore, failure: Exception
) -> None:
    card = await issue(channel, keys)
    card.balance = 100
    committer = server.ledger.committer
    real_flush = committer._flush

    async def failing(items: list[Debit | Load]) -> list[TxnResult]:
        raise failure

    committer._flush = failing
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await terminal_stub(channel).Debit(Terminal(channel, BUS, 1).debit_request(card, 1))
    finally:
        committer._flush = real_flush
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert str(failure) not in (err.value.details() or "")  # no database internals leak out


async def test_an_unregistered_terminal_does_not_make_every_batch_reread_reference_data(
    server: RunningServer,
    channel: grpc.aio.Channel,
    keys: MemoryKeyStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each batch naming an unknown terminal re-read every reference table.

    A misconfigured or hostile terminal could make every flush pay for it.
    Now one primary-key probe says whether the terminal is new; a terminal
    registered meanwhile is still known at its next request, read alone
    (by the probe, or by the change notification before it).
    """
    card = await issue(channel, keys)
    assert (await Terminal(channel, TOPUP, 1).load(card, 1000)).status == APPROVED
    ref = server.ledger.ref
    reads = 0
    real_refresh = ref.refresh

    async def counted(conn: Conn) -> None:
        nonlocal reads
        reads += 1
        await real_refresh(conn)

    monkeypatch.setattr(ref, "refresh", counted)
    stranger = Terminal(channel, "310499999999", 1)
    for _ in range(3):
        reply = await terminal_stub(channel).Debit(stranger.debit_request(card, 100))
        assert reply.status == common_pb2.TXN_STATUS_UNKNOWN_TERMINAL
        card.balance += 100  # the chip's purse was not debited
    assert reads == 0

    async with server.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO terminals (terminal_id, operator_id, kind) VALUES ($1, 'SZBUS', 'bus')",
            310499999999,
        )
    reply = await terminal_stub(channel).Debit(stranger.debit_request(card, 100))
    assert reply.status == APPROVED, reply
    assert reads == 0  # no whole re-read: the one terminal was read
    await assert_books_balance(server.dsn)
