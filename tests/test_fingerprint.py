"""Request fingerprints are stored with every terminal transaction: they must never drift.

A retry is recognised by its fingerprint; if the formula changed between two
versions, a terminal retrying across an upgrade would get CONFLICT for its own
request and the ride would never be posted. These pin the formula.
"""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from onecard.ledger.engine import fingerprint
from onecard.ledger.model import Debit, OfflineRecord


def _stored_form(card_no: str, amount: int, txn_type: int, when: str, kv: int, tac: bytes) -> bytes:
    """The formula the ledger has stored fingerprints with since the first release."""
    parts = ("D", card_no, amount, txn_type, when, kv, tac.hex())
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def test_pinned_value() -> None:
    tac = b"\x01\x02\x03\x04"
    debit = Debit("3104900000000001", 300, 6, "310400000001", 7, "20261123073000", 2, tac)
    assert fingerprint(debit).hex() == "f3fbca4d01f8a27e5bbf37de7300c8dd"


@given(
    card_no=st.from_regex(r"\A[0-9]{16}\Z"),
    amount=st.integers(1, 1_000_000),
    txn_type=st.sampled_from([6, 9]),
    when=st.from_regex(r"\A[0-9]{14}\Z"),
    kv=st.integers(0, 255),
    tac=st.binary(min_size=4, max_size=4),
    seq=st.integers(0, 2**32 - 1),
    counter=st.integers(0, 65535),
)
def test_online_and_offline_purchases_keep_the_stored_form(
    card_no: str, amount: int, txn_type: int, when: str, kv: int, tac: bytes, seq: int, counter: int
) -> None:
    expected = _stored_form(card_no, amount, txn_type, when, kv, tac)
    debit = Debit(card_no, amount, txn_type, "310400000001", seq, when, kv, tac)
    record = OfflineRecord(
        card_no, amount, txn_type, "310400000001", seq, when, kv, tac, counter, 0
    )
    assert fingerprint(debit) == expected
    assert fingerprint(record) == expected  # an offline copy of an online debit is a duplicate
