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
