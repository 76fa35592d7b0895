"""A malformed upload batch is refused naming the record and the field, whatever the field.

check_upload_batch tests every record inline and only looks for the field
to name once one fails; these cases hold the two passes to the same rules.
"""

from __future__ import annotations

from typing import TypedDict

import pytest

from onecard.ledger.crypto.encoding import FieldError
from onecard.ledger.model import OfflineRecord
from onecard.ledger.validation import Limits, check_upload_batch

GOOD = OfflineRecord(
    card_no="3104123456789012",
    amount=200,
    txn_type=0x06,
    terminal_id="310400000001",
    terminal_seq=42,
    date_time="20261122083015",
    key_version=1,
    tac=bytes(4),
    offline_counter=7,
    card_balance_before=1000,
)


class _RecordFields(TypedDict, total=False):
    """OfflineRecord's fields, as keyword arguments to ``_replace``."""

    card_no: str
    amount: int
    txn_type: int
    terminal_id: str
    terminal_seq: int
    date_time: str
    key_version: int
    tac: bytes
    offline_counter: int
    card_balance_before: int


BAD: list[tuple[str, _RecordFields]] = [
    ("card_number", {"card_no": "310412345678901"}),
    ("card_number", {"card_no": "31041234567890１２"}),  # full-width digits
    ("amount", {"amount": 0}),
    ("amount", {"amount": 1_000_001}),
    ("terminal_id", {"terminal_id": "12345"}),
    ("date_time", {"date_time": "20261131083015"}),  # 31 November
    ("date_time", {"date_time": "2026112208301"}),
    ("transaction_type", {"txn_type": 0x02}),
    ("tac", {"tac": bytes(5)}),
    ("offline_counter", {"offline_counter": 0x10000}),
    ("offline_counter", {"offline_counter": -1}),
    ("key_version", {"key_version": 256}),
    ("card_balance_before", {"card_balance_before": -1}),  # balances are unsigned
    ("card_balance_before", {"card_balance_before": 2**32}),
]


@pytest.mark.parametrize(("field", "change"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_the_first_bad_record_and_its_field_are_named(field: str, change: _RecordFields) -> None:
    bad = GOOD._replace(**change)
    records = [GOOD, GOOD._replace(terminal_seq=43), bad, bad]
    total = sum(r.amount for r in records)
    with pytest.raises(FieldError) as info:
        check_upload_batch(records, len(records), total, Limits())
    assert info.value.field == f"records[2].{field}"


def test_a_chip_balance_refusal_states_the_range_it_allows() -> None:
    with pytest.raises(FieldError) as info:
        check_upload_batch([GOOD._replace(card_balance_before=-1)], 1, GOOD.amount, Limits())
    assert info.value.rule == "must be 0 to 4294967295 fen (unsigned 32 bits), got -1"
    top = GOOD._replace(card_balance_before=0xFFFFFFFF)  # the largest a chip can hold
    check_upload_batch([top], 1, GOOD.amount, Limits())


def test_a_good_batch_passes_and_its_claims_are_checked() -> None:
    records = [GOOD, GOOD._replace(terminal_seq=43, amount=150)]
    check_upload_batch(records, 2, 350, Limits())
    with pytest.raises(FieldError) as info:
        check_upload_batch(records, 2, 351, Limits())
    assert info.value.field == "claimed_total"
    assert "350" in info.value.rule


def test_every_wire_field_lands_in_its_own_record_field() -> None:
    from onecard.server.upload_service import _records
    from onecard.v1 import upload_pb2

    wire = upload_pb2.OfflineRecord(
        card_number=GOOD.card_no,
        amount=GOOD.amount,
        transaction_type=GOOD.txn_type,
        terminal_id=GOOD.terminal_id,
        terminal_seq=GOOD.terminal_seq,
        date_time=GOOD.date_time,
        key_version=GOOD.key_version,
        tac=b"\x01\x02\x03\x04",
        offline_counter=GOOD.offline_counter,
        card_balance_before=GOOD.card_balance_before,
    )
    (record,) = _records(upload_pb2.UploadBatch(records=[wire]))
    assert record == GOOD._replace(tac=b"\x01\x02\x03\x04")
    assert type(record) is OfflineRecord and record.card_balance_before == 1000
