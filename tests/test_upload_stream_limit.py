"""Upload streams open at once are bounded per process (--max-upload-streams).

Each open stream can hold megabytes of batches in gRPC's buffers before the
ledger reads them, and nothing bounded how many a process kept open: a
gateway fleet reconnecting at once could grow the server without limit.
One stream past the bound is refused at once, naming the flag, and nothing
it sent is written; a stream that ends gives its place back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from onecard.clients.gateway import Gateway, make_batch
from onecard.ledger.model import PostingKind
from onecard.server.app import RunningServer
from onecard.v1 import upload_pb2, upload_pb2_grpc
from tests.support import dev_keys, start_test_server
from tests.test_upload_api import funded, postings_of, ride


@pytest_asyncio.fixture(loop_scope="session")
async def two_streams(db_dsn: str, tmp_path: Path) -> AsyncIterator[RunningServer]:
    # Two gRPC servers in the process (the default), one bound shared by both.
    running = await start_test_server(
        db_dsn, tmp_path, dev_keys(), max_upload_streams=2, acceptors=2
    )
    try:
        yield running
    finally:
        await running.stop()


async def _held_open(
    batch: upload_pb2.UploadBatch, release: asyncio.Event
) -> AsyncIterator[upload_pb2.UploadBatch]:
    yield batch
    await release.wait()


async def test_a_stream_past_the_limit_is_refused_and_writes_nothing(
    two_streams: RunningServer, db_dsn: str
) -> None:
    keys = dev_keys()
    address = two_streams.address
    release = asyncio.Event()
    async with grpc.aio.insecure_channel(address) as chan:
        cards = [await funded(chan, keys) for _ in range(4)]
    funded_postings = [await postings_of(db_dsn, card) for card in cards]
    # A channel each: separate connections, spread over the process's servers.
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    try:
        open_calls = []
        for i in range(2):
            stub = upload_pb2_grpc.UploadServiceStub(channels[i])
            call = stub.UploadRecords(
                _held_open(make_batch(f"held{i}", [ride(cards[i], 100)]), release)
            )
            reply = await call.read()
            assert isinstance(reply, upload_pb2.UploadBatchReply)
            assert reply.posted == 1
            open_calls.append(call)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await Gateway(channels[2]).upload([make_batch("third", [ride(cards[2], 100)])])
        refused = info.value
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = refused.details() or ""
        assert "2 upload streams are open" in details
        assert "--max-upload-streams (ONECARD_MAX_UPLOAD_STREAMS)" in details
        assert await postings_of(db_dsn, cards[2]) == funded_postings[2], "a refused ride posted"

        # The held streams end; their places are given back.
        release.set()
        for call in open_calls:
            assert await call.code() == grpc.StatusCode.OK
        replies = await Gateway(channels[3]).upload([make_batch("after", [ride(cards[3], 100)])])
        assert [r.posted for r in replies] == [1]
        replies = await Gateway(channels[2]).upload([make_batch("again", [ride(cards[2], 100)])])
        assert [r.posted for r in replies] == [1]
    finally:
        release.set()
        for c in channels:
            await c.close()
    # Every ride answered posted is there exactly once, the refused one never.
    for card, before in zip(cards, funded_postings, strict=True):
        assert await postings_of(db_dsn, card) == [*before, (int(PostingKind.PURCHASE), 100)]
