"""UploadService: offline records in, one outcome per record out, batch by batch.

The stream is the gateway's pipe; each request batch is independent and is
answered (after its COMMIT) before the next one is read, so a gateway knows
exactly which of its batches are safe to delete. A batch refused as malformed
ends the stream with INVALID_ARGUMENT naming the claim or the record field;
nothing of it was written, and every batch answered before it stays committed.

Each open stream can hold a few megabytes of batches in gRPC's buffers (its
flow-control window) before the ledger reads them, so the streams a process
keeps open are bounded (``--max-upload-streams``); one more is answered
RESOURCE_EXHAUSTED before any of its batches is read.

A stop ends every stream at once (``StreamSlots.stop``): the batch in the
ledger is finished and answered after its COMMIT, and the stream is then
ended UNAVAILABLE (the server is shutting down) without reading another
batch, so the gateway resends the rest to a server that stays.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import AsyncIterator
from typing import Any

import grpc

from onecard.ledger.batcher import ShuttingDown
from onecard.ledger.engine import Ledger
from onecard.ledger.model import OfflineRecord, OfflineResult, RecordOutcome
from onecard.ledger.validation import check_upload_batch
from onecard.server.errors import StreamIdle, TooManyStreams, guarded
from onecard.server.metrics import UPLOAD_STREAMS_OPEN
from onecard.v1 import upload_pb2, upload_pb2_grpc

# The record's fields in OfflineRecord's order, read in C: one attrgetter
# call and a tuple re-typed as the named tuple cost 0.56 us a record against
# 0.89 for OfflineRecord(r.card_number, ...) (a 2,000-record batch).
_RECORD_FIELDS = operator.attrgetter(
    "card_number",
    "amount",
    "transaction_type",
    "terminal_id",
    "terminal_seq",
    "date_time",
    "key_version",
    "tac",
    "offline_counter",
    "card_balance_before",
)
_new_tuple = tuple.__new__


def _records(batch: upload_pb2.UploadBatch) -> list[OfflineRecord]:
    fields, new = _RECORD_FIELDS, _new_tuple
    return [new(OfflineRecord, fields(r)) for r in batch.records]


_POSTED = int(RecordOutcome.POSTED)


def _reply(batch_id: str, results: list[OfflineResult]) -> upload_pb2.UploadBatchReply:
    reply = upload_pb2.UploadBatchReply(batch_id=batch_id)
    counts = dict.fromkeys(RecordOutcome, 0)
    add = reply.results.add
    for res in results:
        counts[res.outcome] += 1
        if res.outcome is RecordOutcome.POSTED:  # most records: only two fields to set
            add(outcome=_POSTED, balance_after=res.balance_after)
            continue
        add(
            outcome=int(res.outcome),
            balance_after=res.balance_after,
            original_outcome=int(res.original_outcome or 0),
            quarantine_reason=int(res.quarantine_reason or 0),
            exceptions=[int(e) for e in res.exceptions],
        )
    reply.posted = counts[RecordOutcome.POSTED] + counts[RecordOutcome.POSTED_WITH_EXCEPTION]
    reply.duplicates = counts[RecordOutcome.DUPLICATE]
    # a CONFLICT is not posted and its copy is kept in quarantine (IDENTITY_CONFLICT)
    reply.quarantined = counts[RecordOutcome.QUARANTINED] + counts[RecordOutcome.CONFLICT]
    reply.exceptions = counts[RecordOutcome.POSTED_WITH_EXCEPTION]
    return reply


class StreamSlots:
    """The upload streams open in one process, shared by its ``--acceptors`` servers.

    ``idle_s`` (0: never): a stream with no batch for that long is ended, so
    that a gateway gone without a word (a network cut, a host switched off)
    does not keep its place for gRPC's two hours. Not gRPC's keepalive
    pings, which would find it too but cost every call of the process CPU.

    ``per_connection``: the places one connection (a peer address and port)
    may hold. Without it one gateway's connection could open every place
    and the others were refused until its streams ended.

    ``stop``: the server is stopping, and every stream ends once its batch in
    the ledger (if any) is answered.
    """

    def __init__(self, limit: int, idle_s: float = 0, per_connection: int | None = None) -> None:
        self.limit = limit
        self.idle_s = idle_s
        self.per_connection = limit if per_connection is None else per_connection
        self.open = 0
        self._held: dict[str, int] = {}
        self._stopping: asyncio.Future[None] | None = None

    def stopping(self) -> asyncio.Future[None]:
        """Done once the server has begun to stop."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_future()
        return self._stopping

    def stop(self) -> None:
        """End every stream: those waiting for a batch now, the others once answered.

        gRPC's own stop waits for open calls up to the shutdown grace, and
        an open stream is a call: a gateway's stream idle between batches
        held every stop for the whole grace, and a batch it sent meanwhile
        was read, posted and answered after the stop began.
        """
        stopping = self.stopping()
        if not stopping.done():
            stopping.set_result(None)

    def take(self, peer: str) -> TooManyStreams | None:
        """A place for a stream of ``peer``; the refusal to raise when there is none."""
        if self.open >= self.limit:
            return TooManyStreams(self.limit)
        held = self._held.get(peer, 0)
        if held >= self.per_connection:
            return TooManyStreams(self.per_connection, per_connection=True)
        self._held[peer] = held + 1
        self.open += 1
        UPLOAD_STREAMS_OPEN.inc()
        return None

    def give_back(self, peer: str) -> None:
        held = self._held[peer] - 1
        if held:
            self._held[peer] = held
        else:
            del self._held[peer]
        self.open -= 1
        UPLOAD_STREAMS_OPEN.dec()


async def _next_batch(
    batches: AsyncIterator[upload_pb2.UploadBatch], stopping: asyncio.Future[None], idle_s: float
) -> upload_pb2.UploadBatch:
    """The stream's next batch; ShuttingDown once the server stops, StreamIdle after ``idle_s``.

    A batch that comes with the stop is not read: it is refused with the
    stream (nothing of it written), and the gateway sends it again elsewhere.
    """
    if stopping.done():
        raise ShuttingDown()
    reading = asyncio.ensure_future(anext(batches))
    try:
        await asyncio.wait(
            (reading, stopping), timeout=idle_s or None, return_when=asyncio.FIRST_COMPLETED
        )
    except BaseException:  # the call was cancelled (its peer went away)
        reading.cancel()
        raise
    if stopping.done() or not reading.done():
        reading.cancel()
        await asyncio.wait((reading,))
        if not reading.cancelled():
            reading.exception()  # retrieved: what it read is dropped with the stream
        if stopping.done():
            raise ShuttingDown()
        raise StreamIdle(idle_s)
    return reading.result()


class UploadServicer(upload_pb2_grpc.UploadServiceServicer):
    def __init__(self, ledger: Ledger, streams: StreamSlots) -> None:
        self.ledger = ledger
        self.streams = streams

    async def UploadRecords(
        self,
        request_iterator: AsyncIterator[upload_pb2.UploadBatch],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[upload_pb2.UploadBatchReply]:
        peer = context.peer()
        refusal = self.streams.take(peer)
        if refusal is not None:

            async def refuse(refusal: TooManyStreams = refusal) -> upload_pb2.UploadBatchReply:
                raise refusal

            yield await guarded(context, refuse)  # raises: the stream ends refused
            return
        idle_s = self.streams.idle_s
        stopping = self.streams.stopping()
        batches = aiter(request_iterator)
        try:
            while True:
                try:
                    batch = await _next_batch(batches, stopping, idle_s)
                except StopAsyncIteration:
                    return
                except (ShuttingDown, StreamIdle) as exc:

                    async def end(exc: Exception = exc) -> upload_pb2.UploadBatchReply:
                        raise exc

                    yield await guarded(context, end)  # raises: the stream ends
                    return

                async def call(
                    batch: upload_pb2.UploadBatch = batch,
                ) -> upload_pb2.UploadBatchReply:
                    records = _records(batch)
                    check_upload_batch(
                        records, batch.claimed_count, batch.claimed_total, self.ledger.limits
                    )
                    results = await self.ledger.submit_offline_records(records)
                    return _reply(batch.batch_id, results)

                yield await guarded(context, call)
        finally:
            self.streams.give_back(peer)
