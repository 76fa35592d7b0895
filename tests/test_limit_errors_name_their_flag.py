"""A refusal caused by a configured limit names the flag that sets it (DESIGN.md decision 9).

The queue-full reply said "queue is full (1 requests waiting)" and the amount
refusal "over the system limit of N fen": true, but not what an operator can
change. The ledger carries the setting's name; the server adds the flag.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from onecard.clients.gateway import Gateway, make_batch
from onecard.clients.terminal import Terminal
from onecard.ledger.engine import UPLOAD_COMMITTER, BatchSettings
from onecard.ledger.validation import Limits
from onecard.server.app import RunningServer
from tests.support import dev_keys, start_test_server, wait_until
from tests.test_upload_api import funded, ride


@pytest_asyncio.fixture(loop_scope="session")
async def small(db_dsn: str, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A server whose limits are small enough to hit: amount, queues, upload batch."""
    running = await start_test_server(
        db_dsn,
        tmp_path,
        dev_keys(),
        limits=Limits(max_amount=5_000, max_upload_batch=2),
        # A long linger: the test sees an upload queued, then taken by the flusher.
        batching=BatchSettings(
            max_batch=2, max_queue=1, upload_max_queue=1, upload_flushers=1, linger=0.3
        ),
    )
    try:
        yield running
    finally:
        await running.stop()


_seqs = itertools.count(50_000, 100)


async def _refusal(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_an_amount_over_the_limit_names_max_amount(small: RunningServer) -> None:
    keys = dev_keys()
    async with grpc.aio.insecure_channel(small.address) as chan:
        card = await funded(chan, keys)
        await Terminal(chan, "310400000009", next(_seqs)).load(card, 5_000)
        bus = Terminal(chan, "310400000001", next(_seqs))
        refused = await _refusal(bus.stub.Debit(bus.debit_request(card, 6_000)))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.details() or ""
    assert "over the system limit of 5000 fen" in details
    assert "--max-amount (ONECARD_MAX_AMOUNT)" in details


async def test_a_full_online_queue_names_max_queue(small: RunningServer) -> None:
    keys = dev_keys()
    async with grpc.aio.insecure_channel(small.address) as chan:
        card = await funded(chan, keys)
        bus = Terminal(chan, "310400000001", next(_seqs))
        replies = await asyncio.gather(
            *(bus.stub.Debit(bus.debit_request(card, 10)) for _ in range(30)),
            return_exceptions=True,
        )
    refused = [r for r in replies if isinstance(r, grpc.aio.AioRpcError)]
    assert refused, "a queue of 1 must refuse some of 30 simultaneous debits"
    for r in refused:
        assert r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-queue (ONECARD_MAX_QUEUE)" in (r.details() or "")


async def test_uploads_name_max_upload_queue_and_max_upload_batch(small: RunningServer) -> None:
    keys = dev_keys()
    ledger = small.ledger
    async with grpc.aio.insecure_channel(small.address) as chan:
        cards = [await funded(chan, keys) for _ in range(3)]
        too_many = make_batch("big", [ride(c, 10) for c in cards])
        refused = await _refusal(Gateway(chan).upload([too_many]))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-upload-batch (ONECARD_MAX_UPLOAD_BATCH)" in (refused.details() or "")

        # The flusher holds one batch (every connection taken by the test), a
        # second fills the queue of one; a third is refused.
        held = [await small.pool.acquire() for _ in range(small.pool.get_max_size())]
        try:
            taken = asyncio.create_task(Gateway(chan).upload([make_batch("a", [ride(cards[0])])]))
            await wait_until(lambda: ledger.queued()[UPLOAD_COMMITTER] == 1)
            await wait_until(lambda: ledger.queued()[UPLOAD_COMMITTER] == 0)
            queued = asyncio.create_task(Gateway(chan).upload([make_batch("b", [ride(cards[1])])]))
            await wait_until(lambda: ledger.queued()[UPLOAD_COMMITTER] == 1)
            refused = await _refusal(Gateway(chan).upload([make_batch("c", [ride(cards[2])])]))
        finally:
            for conn in held:
                await small.pool.release(conn)
        await taken
        await queued
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-upload-queue (ONECARD_MAX_UPLOAD_QUEUE)" in (refused.details() or "")


@pytest.mark.parametrize("held", ["card row", "table"])
async def test_a_lock_held_past_the_timeout_names_lock_timeout_ms(
    db_dsn: str, tmp_path: Path, held: str
) -> None:
    """A lock wait cut short by --lock-timeout-ms named no flag; a table's was even
    answered and logged as a database outage while health said SERVING (found by review)."""
    import asyncpg

    from tests.support import issue

    running = await start_test_server(db_dsn, tmp_path, dev_keys(), lock_timeout_ms=300)
    holder = await asyncpg.connect(db_dsn)
    try:
        async with grpc.aio.insecure_channel(running.address) as chan:
            card = await issue(chan, dev_keys())
            topup = Terminal(chan, "310400000009", 7_000)
            assert (await topup.load(card, 1_000)).status == 1
            async with holder.transaction():
                if held == "card row":
                    await holder.execute(
                        "SELECT 1 FROM cards WHERE card_no = $1 FOR UPDATE", int(card.card_no)
                    )
                else:
                    await holder.execute("LOCK TABLE terminal_txns IN ACCESS EXCLUSIVE MODE")
                bus = Terminal(chan, "310400000001", 50)
                refused = await _refusal(bus.stub.Debit(bus.debit_request(card, 100), timeout=10))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        details = refused.details() or ""
        assert "past the lock timeout" in details and "unavailable" not in details, details
        assert details.endswith("[limit set by --lock-timeout-ms (ONECARD_LOCK_TIMEOUT_MS)]")
    finally:
        await holder.close()
        await running.stop()
