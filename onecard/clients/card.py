"""A simulated card with its SAM, per PROTOCOL.md: what a real terminal's hardware does.

It holds the card's own derived keys (never the master keys), keeps its
purse balance and counters like the chip does, signs purchases with a TAC,
opens a load with MAC1 and credits itself only on a MAC2 that verifies.
It runs on the pure-Python reference crypto: a terminal computes one MAC per
tap, and the reference is the implementation written straight from the page.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from onecard.ledger.crypto import reference
from onecard.ledger.crypto.suites import TYPE_LOAD, TYPE_PURCHASE, Suite
from onecard.ledger.keys import KeyVersion


class CardRefused(Exception):
    """The card itself refuses: a MAC2 that does not verify, or a purse limit."""


@dataclass
class PendingLoad:
    amount: int
    terminal_id: str
    random: bytes
    online_counter: int
    old_balance: int
    mac1: bytes
    session_key: bytes = field(repr=False)


@dataclass
class SimulatedCard:
    card_no: str
    version: KeyVersion = field(repr=False)
    balance: int = 0
    online_counter: int = 0
    offline_counter: int = 0
    _tac_key: bytes = field(default=b"", repr=False)
    _load_key: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        v = self.version
        self._tac_key = reference.derive_card_key(
            v.suite, v.mtk.reveal(), self.card_no, v.kv, reference.PURPOSE_TAC
        )
        self._load_key = reference.derive_card_key(
            v.suite, v.mlk.reveal(), self.card_no, v.kv, reference.PURPOSE_LOAD
        )

    @property
    def suite(self) -> Suite:
        return self.version.suite

    @property
    def key_version(self) -> int:
        return self.version.kv

    def purchase(
        self,
        amount: int,
        terminal_id: str,
        terminal_seq: int,
        date_time: str,
        txn_type: int = TYPE_PURCHASE,
    ) -> bytes:
        """Debit the chip's purse and sign the record (the card refuses to go below zero)."""
        if amount > self.balance:
            raise CardRefused(f"card balance {self.balance} is below {amount}")
        tac = reference.purchase_tac(
            self.suite, self._tac_key, amount, txn_type, terminal_id, terminal_seq, date_time
        )
        self.balance -= amount
        self.offline_counter += 1
        return tac

    def sign_purchase(
        self,
        amount: int,
        terminal_id: str,
        terminal_seq: int,
        date_time: str,
        txn_type: int = TYPE_PURCHASE,
    ) -> bytes:
        """The TAC alone, without touching the chip's purse (for crafted test records)."""
        return reference.purchase_tac(
            self.suite, self._tac_key, amount, txn_type, terminal_id, terminal_seq, date_time
        )

    def begin_load(self, amount: int, terminal_id: str) -> PendingLoad:
        random = os.urandom(4)
        seslk = reference.load_session_key(self.suite, self._load_key, random, self.online_counter)
        mac1 = reference.load_mac1(self.suite, seslk, self.balance, amount, TYPE_LOAD, terminal_id)
        return PendingLoad(
            amount, terminal_id, random, self.online_counter, self.balance, mac1, seslk
        )

    def finish_load(self, pending: PendingLoad, date_time: str, mac2: bytes) -> None:
        expected = reference.load_mac2(
            self.suite,
            pending.session_key,
            pending.amount,
            TYPE_LOAD,
            pending.terminal_id,
            date_time,
        )
        if not reference.constant_time_equal(expected, mac2):
            raise CardRefused("MAC2 does not verify; the card keeps its balance")
        self.balance += pending.amount
        self.online_counter += 1
