"""A card whose row another session holds fails only its own requests, not its batch.

With --lock-timeout-ms a batch stopped waiting for a row nobody released
(a psql session left open on a card) and failed whole: every other card's
request in it was told to retry too, and while the held card's terminal
kept resending, every batch it landed in failed again, so one stuck row
stopped a process's debits and uploads. Now the requests for the held card
are refused (UNAVAILABLE, retry-safe) and the rest of the batch is written
without them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest_asyncio

from onecard.clients.gateway import Gateway, make_batch
from onecard.clients.terminal import Terminal
from onecard.ledger.engine import BatchSettings
from onecard.ledger.model import PostingKind
from onecard.server.app import RunningServer
from onecard.v1 import common_pb2, terminal_pb2
from tests.support import assert_books_balance, dev_keys, issue, start_test_server
from tests.test_upload_api import balance_of, funded, postings_of, replace_by_sql, ride

APPROVED = common_pb2.TXN_STATUS_APPROVED
HELD = "locked by another database session"


@pytest_asyncio.fixture(loop_scope="session")
async def server(db_dsn: str, tmp_path: Path) -> AsyncIterator[RunningServer]:
    # A linger long enough that requests sent together share one batch.
    running = await start_test_server(
        db_dsn,
        tmp_path,
        dev_keys(),
        lock_timeout_ms=300,
        batching=BatchSettings(linger=0.2, upload_flushers=1),
    )
    try:
        yield running
    finally:
        await running.stop()


async def _hold(
    dsn: str, card_no: str
) -> tuple[asyncpg.Connection, asyncpg.transaction.Transaction]:
    holder = await asyncpg.connect(dsn)
    tx = holder.transaction()
    await tx.start()
    await holder.execute("SELECT 1 FROM cards WHERE card_no = $1 FOR UPDATE", int(card_no))
    return holder, tx


async def _while_held(dsn: str, card_no: str, *calls: Awaitable[Any]) -> list[Any]:
    """The calls made together while another session holds the card's row, then let go."""
    holder, tx = await _hold(dsn, card_no)
    try:
        return await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await tx.rollback()
        await holder.close()


def _assert_refused_as_held(reply: object) -> None:
    assert isinstance(reply, grpc.aio.AioRpcError), reply
    assert reply.code() == grpc.StatusCode.UNAVAILABLE
    assert HELD in (reply.details() or "")


async def test_a_held_card_refuses_its_debit_and_the_batch_goes_on(
    server: RunningServer, db_dsn: str
) -> None:
    keys = dev_keys()
    async with grpc.aio.insecure_channel(server.address) as chan:
        held, free = await funded(chan, keys), await funded(chan, keys)
        before = [await postings_of(db_dsn, c) for c in (held, free)]
        bus = Terminal(chan, "310400000001", 90_000)
        on_held, on_free = bus.debit_request(held, 100), bus.debit_request(free, 100)
        refused, approved = await _while_held(
            db_dsn, held.card_no, bus.stub.Debit(on_held), bus.stub.Debit(on_free)
        )
        assert not isinstance(approved, BaseException), approved
        assert approved.status == APPROVED
        _assert_refused_as_held(refused)
        # The terminal resends what was not answered: posted once, now.
        assert (await bus.stub.Debit(on_held)).status == APPROVED
    purchase = (int(PostingKind.PURCHASE), 100)
    assert await postings_of(db_dsn, held) == [*before[0], purchase]
    assert await postings_of(db_dsn, free) == [*before[1], purchase]
    await assert_books_balance(db_dsn)


async def test_a_held_card_refuses_its_upload_batch_and_the_others_post(
    server: RunningServer, db_dsn: str
) -> None:
    keys = dev_keys()
    async with grpc.aio.insecure_channel(server.address) as chan:
        held, free = await funded(chan, keys), await funded(chan, keys)
        before = [await postings_of(db_dsn, c) for c in (held, free)]
        on_held = make_batch("held", [ride(held, 100)])
        on_free = make_batch("free", [ride(free, 100)])
        refused, replies = await _while_held(
            db_dsn,
            held.card_no,
            Gateway(chan).upload([on_held]),
            Gateway(chan).upload([on_free]),
        )
        assert not isinstance(replies, BaseException), replies
        assert [r.posted for r in replies] == [1]
        _assert_refused_as_held(refused)
        # The gateway sends the refused batch again: posted once, now.
        assert [r.posted for r in await Gateway(chan).upload([on_held])] == [1]
    purchase = (int(PostingKind.PURCHASE), 100)
    assert await postings_of(db_dsn, held) == [*before[0], purchase]
    assert await postings_of(db_dsn, free) == [*before[1], purchase]
    await assert_books_balance(db_dsn)


async def test_a_held_cards_resends_are_refused_at_once_and_others_keep_their_time(
    db_dsn: str, tmp_path: Path
) -> None:
    """Once a batch has waited on a held card, its resends do not wait again.

    Each resend of the held card's debit used to put the batch it landed in
    through the whole lock timeout again: the debits of other cards queued
    behind it ran out of their deadline, where now they are written at once.
    """
    keys = dev_keys()
    running = await start_test_server(db_dsn, tmp_path, keys, lock_timeout_ms=3000)
    try:
        async with grpc.aio.insecure_channel(running.address) as chan:
            held, free = await funded(chan, keys), await funded(chan, keys)
            before = [await postings_of(db_dsn, c) for c in (held, free)]
            bus = Terminal(chan, "310400000001", 90_000)
            on_held, on_free = bus.debit_request(held, 100), bus.debit_request(free, 100)
            holder, tx = await _hold(db_dsn, held.card_no)
            try:
                first = await asyncio.gather(bus.stub.Debit(on_held), return_exceptions=True)
                _assert_refused_as_held(first[0])
                # The terminal resends while the row is still held; another
                # card's debit comes with it, each allowed half the timeout.
                refused: terminal_pb2.DebitReply | BaseException
                approved: terminal_pb2.DebitReply | BaseException
                refused, approved = await asyncio.gather(
                    bus.stub.Debit(on_held, timeout=1.5),
                    bus.stub.Debit(on_free, timeout=1.5),
                    return_exceptions=True,
                )
            finally:
                await tx.rollback()
                await holder.close()
            assert not isinstance(approved, BaseException), approved
            assert approved.status == APPROVED
            _assert_refused_as_held(refused)
            # Released: the next resend is written, once.
            assert (await bus.stub.Debit(on_held, timeout=1.5)).status == APPROVED
    finally:
        await running.stop()
    purchase = (int(PostingKind.PURCHASE), 100)
    assert await postings_of(db_dsn, held) == [*before[0], purchase]
    assert await postings_of(db_dsn, free) == [*before[1], purchase]
    await assert_books_balance(db_dsn)


async def test_a_held_successor_refuses_the_replaced_cards_upload_only(
    server: RunningServer, db_dsn: str
) -> None:
    """A replaced card's late record moves money on to the card that replaced it,
    so a hold on that card holds the record too: only its batch is refused."""
    keys = dev_keys()
    async with grpc.aio.insecure_channel(server.address) as chan:
        old, new, free = await funded(chan, keys), await issue(chan, keys), await funded(chan, keys)
        await replace_by_sql(db_dsn, old, new)
        on_old = make_batch("old", [ride(old, 100)])
        on_free = make_batch("free", [ride(free, 100)])
        refused, replies = await _while_held(
            db_dsn,
            new.card_no,
            Gateway(chan).upload([on_old]),
            Gateway(chan).upload([on_free]),
        )
        assert not isinstance(replies, BaseException), replies
        assert [r.posted for r in replies] == [1]
        _assert_refused_as_held(refused)
        (again,) = await Gateway(chan).upload([on_old])
        assert again.posted == 1
    assert await balance_of(db_dsn, new) == 5000 - 100
    assert await balance_of(db_dsn, free) == 5000 - 100
    await assert_books_balance(db_dsn)


async def test_a_replaced_cards_debit_is_answered_while_its_successor_is_held(
    server: RunningServer, db_dsn: str
) -> None:
    """An online debit locks only its own card: a hold on the card that replaced it
    refuses the successor's debit, and the old card's is declined at once, as always."""
    keys = dev_keys()
    async with grpc.aio.insecure_channel(server.address) as chan:
        old, new = await funded(chan, keys), await funded(chan, keys)
        await replace_by_sql(db_dsn, old, new)
        bus = Terminal(chan, "310400000001", 90_000)
        on_new, on_old = bus.debit_request(new, 100), bus.debit_request(old, 100)
        refused, declined = await _while_held(
            db_dsn, new.card_no, bus.stub.Debit(on_new), bus.stub.Debit(on_old)
        )
        _assert_refused_as_held(refused)
        assert not isinstance(declined, BaseException), declined
        assert declined.status == common_pb2.TXN_STATUS_CARD_NOT_ACTIVE
        # Its terminal asks again while nothing is held: the same answer.
        again = await bus.stub.Debit(on_old)
        assert common_pb2.TXN_STATUS_CARD_NOT_ACTIVE in (again.status, again.original_status)
    assert await balance_of(db_dsn, new) == 5000 + 5000  # its own and the old card's
    await assert_books_balance(db_dsn)


async def test_an_online_flush_does_not_forget_a_card_held_through_its_successor(
    db_dsn: str, tmp_path: Path
) -> None:
    """Online and upload batches each remember the cards they found held.

    An upload of a replaced card waits for the card that replaced it, an
    online debit of it does not. They shared one memory, so the debit, finding
    the old card's own row free, struck it off, and the upload's next resend
    put its batch through the whole lock timeout again.
    """
    keys = dev_keys()
    running = await start_test_server(db_dsn, tmp_path, keys, lock_timeout_ms=3000)
    try:
        async with grpc.aio.insecure_channel(running.address) as chan:
            old, new = await funded(chan, keys), await funded(chan, keys)
            await replace_by_sql(db_dsn, old, new)
            on_old = make_batch("old", [ride(old, 100)])
            bus = Terminal(chan, "310400000001", 95_000)
            holder, tx = await _hold(db_dsn, new.card_no)
            try:
                first = await asyncio.gather(Gateway(chan).upload([on_old]), return_exceptions=True)
                _assert_refused_as_held(first[0])
                declined = await bus.debit(old, 100)  # its own row is free
                assert declined.status == common_pb2.TXN_STATUS_CARD_NOT_ACTIVE
                resent = await asyncio.gather(
                    asyncio.wait_for(Gateway(chan).upload([on_old]), 1.5),
                    return_exceptions=True,
                )
            finally:
                await tx.rollback()
                await holder.close()
            _assert_refused_as_held(resent[0])
            (again,) = await Gateway(chan).upload([on_old])
            assert again.posted == 1
    finally:
        await running.stop()
    assert await balance_of(db_dsn, new) == 5000 + 5000 - 100
    await assert_books_balance(db_dsn)
