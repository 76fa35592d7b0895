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
from prometheus_client import REGISTRY

from onecard.clients.gateway import Gateway, make_batch
from onecard.ledger.model import PostingKind
from onecard.server.app import RunningServer
from onecard.v1 import upload_pb2, upload_pb2_grpc
from tests.support import dev_keys, start_test_server
from tests.test_upload_api import funded, postings_of, ride

#: An UploadRecords call as the gateway's side of the stream sees it.
UploadCall = grpc.aio.StreamStreamCall[upload_pb2.UploadBatch, upload_pb2.UploadBatchReply]


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


async def _open_after_one_batch(
    stub: upload_pb2_grpc.UploadServiceStub, batch: upload_pb2.UploadBatch, release: asyncio.Event
) -> UploadCall:
    """A stream whose one batch is posted, then kept open until ``release``."""
    call: UploadCall = stub.UploadRecords(_held_open(batch, release))
    reply = await call.read()
    assert isinstance(reply, upload_pb2.UploadBatchReply)
    assert reply.posted == 1
    return call


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
        open_calls = [
            await _open_after_one_batch(
                upload_pb2_grpc.UploadServiceStub(channels[i]),
                make_batch(f"held{i}", [ride(cards[i], 100)]),
                release,
            )
            for i in range(2)
        ]

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
            await c.close(grace=None)
    # Every ride answered posted is there exactly once, the refused one never.
    for card, before in zip(cards, funded_postings, strict=True):
        assert await postings_of(db_dsn, card) == [*before, (int(PostingKind.PURCHASE), 100)]


async def test_one_connection_cannot_take_every_place(db_dsn: str, tmp_path: Path) -> None:
    """A gateway that opens stream after stream on its connection (a retry loop
    that never closes one) is refused past its share; other gateways still get in."""
    keys = dev_keys()
    running = await start_test_server(
        db_dsn, tmp_path, keys, max_upload_streams=4, max_upload_streams_per_connection=2
    )
    release = asyncio.Event()
    # A subchannel pool each: channels to one address otherwise share a connection.
    own = [("grpc.use_local_subchannel_pool", 1)]
    greedy = grpc.aio.insecure_channel(running.address, options=own)
    other = grpc.aio.insecure_channel(running.address, options=own)
    try:
        cards = [await funded(greedy, keys) for _ in range(4)]
        before = [await postings_of(db_dsn, card) for card in cards]
        stub = upload_pb2_grpc.UploadServiceStub(greedy)
        held = [
            await _open_after_one_batch(
                stub, make_batch(f"held{i}", [ride(cards[i], 100)]), release
            )
            for i in range(2)
        ]

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await Gateway(greedy).upload([make_batch("third", [ride(cards[2], 100)])])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = info.value.details() or ""
        assert "2 upload streams are open on this connection" in details
        assert "--max-upload-streams-per-connection" in details
        assert await postings_of(db_dsn, cards[2]) == before[2], "a refused ride posted"

        # The process has places left, and another connection gets one.
        replies = await Gateway(other).upload([make_batch("other", [ride(cards[3], 100)])])
        assert [r.posted for r in replies] == [1]

        # The greedy connection's streams end; it may open one again.
        release.set()
        for call in held:
            assert await call.code() == grpc.StatusCode.OK
        replies = await Gateway(greedy).upload([make_batch("again", [ride(cards[2], 100)])])
        assert [r.posted for r in replies] == [1]
    finally:
        release.set()
        await greedy.close(grace=None)
        await other.close(grace=None)
        await running.stop()
    for card, was in zip(cards, before, strict=True):
        assert await postings_of(db_dsn, card) == [*was, (int(PostingKind.PURCHASE), 100)]


class _BlackHole:
    """A TCP relay to the server that, once cut, goes silent and keeps its sockets
    open: a gateway gone without a word (a network cut, a host powered off)."""

    def __init__(self, target: str) -> None:
        self.host, _, port = target.rpartition(":")
        self.port = int(port)
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while not self.cut.is_set():
            read = asyncio.ensure_future(src.read(65536))
            cut = asyncio.ensure_future(self.cut.wait())
            await asyncio.wait([read, cut], return_when=asyncio.FIRST_COMPLETED)
            cut.cancel()
            if not read.done():
                read.cancel()
                break
            data = read.result()
            if not data:
                break
            dst.write(data)
            await dst.drain()
        await asyncio.Event().wait()  # silent from now on, sockets kept open


@pytest.mark.parametrize(
    "found_by",
    [{"upload_idle_s": 1}, {"upload_idle_s": 0, "keepalive_s": 1}],
    ids=["upload idle limit", "keepalive pings"],
)
async def test_a_gateway_gone_without_a_word_gives_its_stream_place_back(
    db_dsn: str, tmp_path: Path, found_by: dict[str, int]
) -> None:
    """A stream with no batch for --upload-idle-s is ended, and with --keepalive-s a
    connection that does not answer the server's pings is dropped: with gRPC's
    two-hour keepalive alone a vanished gateway kept its place, and enough of them
    refused every upload of the process."""
    keys = dev_keys()
    running = await start_test_server(
        db_dsn, tmp_path, keys, max_upload_streams=1, acceptors=1, **found_by
    )
    try:
        async with grpc.aio.insecure_channel(running.address) as chan:
            card = await funded(chan, keys)
        release = asyncio.Event()
        hole = _BlackHole(running.address)
        async with hole as via:
            gone = grpc.aio.insecure_channel(via)
            stub = upload_pb2_grpc.UploadServiceStub(gone)
            call = stub.UploadRecords(_held_open(make_batch("gone", [ride(card, 100)]), release))
            first = await call.read()
            assert first.posted == 1
            assert REGISTRY.get_sample_value("onecard_upload_streams_open") == 1
            hole.cut.set()
            async with grpc.aio.insecure_channel(running.address) as direct:
                # Its place comes back once the silent stream has idled out.
                began = asyncio.get_running_loop().time()
                deadline = began + 60
                late = make_batch("next", [ride(card, 100)])
                while True:
                    try:
                        (reply,) = await Gateway(direct).upload([late])
                        break
                    except grpc.aio.AioRpcError as exc:
                        # A refusal that overtakes the batch being sent reaches a
                        # grpc.aio client as INTERNAL (grpc/grpc#36066).
                        refused = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)
                        assert exc.code() in refused, exc
                        assert asyncio.get_running_loop().time() < deadline, "place never back"
                        await asyncio.sleep(0.2)
                assert reply.posted == 1
            call.cancel()
            await gone.close(None)
    finally:
        await running.stop()
    purchase = (int(PostingKind.PURCHASE), 100)
    assert (await postings_of(db_dsn, card))[-2:] == [purchase, purchase]
    assert REGISTRY.get_sample_value("onecard_upload_streams_open") == 0


async def test_an_idle_stream_is_ended_naming_the_limit_and_a_busy_one_is_not(
    db_dsn: str, tmp_path: Path
) -> None:
    keys = dev_keys()
    running = await start_test_server(db_dsn, tmp_path, keys, upload_idle_s=1)
    try:
        async with grpc.aio.insecure_channel(running.address) as chan:
            card = await funded(chan, keys)
            stub = upload_pb2_grpc.UploadServiceStub(chan)

            async def every_half_second() -> AsyncIterator[upload_pb2.UploadBatch]:
                for i in range(4):  # two seconds in all, never a second apart
                    yield make_batch(f"busy{i}", [ride(card, 10)])
                    await asyncio.sleep(0.5)

            busy = [reply.posted async for reply in stub.UploadRecords(every_half_second())]
            assert busy == [1, 1, 1, 1]

            call = stub.UploadRecords(
                _held_open(make_batch("idle", [ride(card, 10)]), asyncio.Event())
            )
            assert (await call.read()).posted == 1
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "--upload-idle-s" in (ended.value.details() or "")
    finally:
        await running.stop()
    assert REGISTRY.get_sample_value("onecard_upload_streams_open") == 0
