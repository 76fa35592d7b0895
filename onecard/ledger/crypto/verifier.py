"""Batch verification contract shared by the reference twin and the fast path.

Both implementations take a batch of checks and answer one status per
check, in input order, so the server can swap one for the other and the
tests can run the same batches through both and compare.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from onecard.ledger.crypto import reference
from onecard.ledger.crypto.suites import Suite
from onecard.ledger.keys import KeyStore, KeyVersion

__all__ = [
    "KEY_UNKNOWN",
    "MAC_BAD",
    "MAC_OK",
    "CardVerifier",
    "LoadCheck",
    "PurchaseCheck",
    "ReferenceVerifier",
]

#: Per-check outcomes; plain ints so the Cython side can return them without boxing enums.
MAC_OK = 0
MAC_BAD = 1
KEY_UNKNOWN = 2


class PurchaseCheck(NamedTuple):
    """One purchase record's TAC to verify (PROTOCOL.md "Purchase: the TAC")."""

    issuer: str
    kv: int
    card_no: str
    amount: int
    txn_type: int
    terminal_id: str
    terminal_seq: int
    date_time: str
    tac: bytes


class LoadCheck(NamedTuple):
    """One load's MAC1 to verify and MAC2 to produce (PROTOCOL.md "Load")."""

    issuer: str
    kv: int
    card_no: str
    random: bytes
    online_counter: int
    old_balance: int
    amount: int
    txn_type: int
    terminal_id: str
    date_time: str
    mac1: bytes


class CardVerifier(Protocol):
    """What the ledger calls to check card MACs, whichever implementation is behind it."""

    name: str

    def verify_purchases(self, checks: Sequence[PurchaseCheck]) -> list[int]:
        """One of MAC_OK / MAC_BAD / KEY_UNKNOWN per check, in input order."""
        ...

    def verify_loads(self, checks: Sequence[LoadCheck]) -> list[tuple[int, bytes]]:
        """(status, MAC2) per check, in input order; MAC2 is b"" unless status is MAC_OK."""
        ...

    def clear_cache(self) -> None:
        """Forget every derived card key."""
        ...


_CacheKey = tuple[str, int, str, int]


class ReferenceVerifier:
    """The twin's verifier: plain Python, one check at a time, derived keys cached.

    Derived card keys are held in a bounded LRU keyed by
    ``(issuer, kv, card_no, purpose)``; the whole cache is dropped whenever
    the key store's ``generation`` changes, so a reload never leaves a key
    derived from a replaced master key in use. A malformed field (card
    number, terminal id, date) raises ``FieldError``; callers validate
    records before they reach the verifier.
    """

    name = "python-reference"

    def __init__(self, keys: KeyStore, cache_size: int = 100_000) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must not be negative, got {cache_size}")
        self._keys = keys
        self._cache_size = cache_size
        self._cache: OrderedDict[_CacheKey, bytes] = OrderedDict()
        self._generation = keys.generation
        self._lock = threading.Lock()

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._generation = self._keys.generation

    def _sync_generation(self) -> None:
        generation = self._keys.generation
        if generation != self._generation:
            with self._lock:
                self._cache.clear()
                self._generation = generation

    def _card_key(self, version: KeyVersion, card_no: str, purpose: int) -> bytes:
        ck: _CacheKey = (version.issuer, version.kv, card_no, purpose)
        with self._lock:
            hit = self._cache.get(ck)
            if hit is not None:
                self._cache.move_to_end(ck)
                return hit
        master = version.mtk if purpose == reference.PURPOSE_TAC else version.mlk
        key = reference.derive_card_key(
            version.suite, master.reveal(), card_no, version.kv, purpose
        )
        if self._cache_size:
            with self._lock:
                self._cache[ck] = key
                self._cache.move_to_end(ck)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return key

    def verify_purchases(self, checks: Sequence[PurchaseCheck]) -> list[int]:
        self._sync_generation()
        out: list[int] = []
        for c in checks:
            version = self._keys.get(c.issuer, c.kv)
            if version is None:
                out.append(KEY_UNKNOWN)
                continue
            suite = Suite(version.suite)
            card_key = self._card_key(version, c.card_no, reference.PURPOSE_TAC)
            expected = reference.purchase_tac(
                suite, card_key, c.amount, c.txn_type, c.terminal_id, c.terminal_seq, c.date_time
            )
            tac = bytes(c.tac)
            ok = len(tac) == len(expected) and reference.constant_time_equal(tac, expected)
            out.append(MAC_OK if ok else MAC_BAD)
        return out

    def verify_loads(self, checks: Sequence[LoadCheck]) -> list[tuple[int, bytes]]:
        self._sync_generation()
        out: list[tuple[int, bytes]] = []
        for c in checks:
            version = self._keys.get(c.issuer, c.kv)
            if version is None:
                out.append((KEY_UNKNOWN, b""))
                continue
            suite = Suite(version.suite)
            card_key = self._card_key(version, c.card_no, reference.PURPOSE_LOAD)
            if len(c.random) != 4:
                # Not a field the encoders know; a card that sends a bad random has a bad MAC1.
                out.append((MAC_BAD, b""))
                continue
            seslk = reference.load_session_key(suite, card_key, c.random, c.online_counter)
            expected = reference.load_mac1(
                suite, seslk, c.old_balance, c.amount, c.txn_type, c.terminal_id
            )
            mac1 = bytes(c.mac1)
            if not (len(mac1) == len(expected) and reference.constant_time_equal(mac1, expected)):
                out.append((MAC_BAD, b""))
                continue
            mac2 = reference.load_mac2(
                suite, seslk, c.amount, c.txn_type, c.terminal_id, c.date_time
            )
            out.append((MAC_OK, mac2))
        return out
