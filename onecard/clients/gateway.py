"""A terminal gateway's side of the offline upload: records from cards, batches up a stream."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence

import grpc

from onecard.clients.card import SimulatedCard
from onecard.ledger.crypto.suites import TYPE_PURCHASE
from onecard.v1 import upload_pb2, upload_pb2_grpc


def offline_record(
    card: SimulatedCard, amount: int, terminal_id: str, seq: int, date_time: str
) -> upload_pb2.OfflineRecord:
    """The card pays (its purse and counter move) and the validator keeps the record."""
    before = card.balance
    tac = card.purchase(amount, terminal_id, seq, date_time)
    return upload_pb2.OfflineRecord(
        card_number=card.card_no,
        amount=amount,
        transaction_type=TYPE_PURCHASE,
        terminal_id=terminal_id,
        terminal_seq=seq,
        date_time=date_time,
        key_version=card.key_version,
        tac=tac,
        offline_counter=card.offline_counter,
        card_balance_before=before,
    )


def make_batch(
    batch_id: str, records: Sequence[upload_pb2.OfflineRecord]
) -> upload_pb2.UploadBatch:
    """A batch with honest claims (count and total), as a gateway sends it."""
    return upload_pb2.UploadBatch(
        batch_id=batch_id,
        records=records,
        claimed_count=len(records),
        claimed_total=sum(r.amount for r in records),
    )


class Gateway:
    """Uploads batches over one stream; a reply arrives per batch, after its COMMIT."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = upload_pb2_grpc.UploadServiceStub(channel)
        self._ids = itertools.count(1)

    async def upload(
        self, batches: Sequence[upload_pb2.UploadBatch]
    ) -> list[upload_pb2.UploadBatchReply]:
        async def requests() -> AsyncIterator[upload_pb2.UploadBatch]:
            for batch in batches:
                yield batch

        call = self.stub.UploadRecords(requests())
        return [reply async for reply in call]

    async def upload_records(
        self, records: Sequence[upload_pb2.OfflineRecord], batch_size: int = 500
    ) -> list[upload_pb2.UploadBatchReply]:
        batches = [
            make_batch(f"b{next(self._ids)}", records[i : i + batch_size])
            for i in range(0, len(records), batch_size)
        ]
        return await self.upload(batches)
