"""The usual-record path of the upload decision does exactly what the full path does.

offline_batch._decide answers a usual record (trusted, the card's key version,
new, active card, the reported balance, the next counter, money to pay)
itself and hands every other record to _decide_in_full. Here random batches
that mix usual and unusual records (and keys answered before the batch,
online or offline) go through both from the same state; every outcome, every
write, every card and every remembered key must come out the same.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import random

import pytest

from onecard.ledger.crypto.verifier import KEY_UNKNOWN, MAC_BAD, MAC_OK
from onecard.ledger.model import CardStatus, OfflineRecord, TxnKind, TxnStatus
from onecard.ledger.refdata import ReferenceData
from onecard.ledger.storage import offline_batch
from onecard.ledger.storage.offline_batch import (
    PreparedRecord,
    _Card,
    _decide,
    _decide_in_full,
    _Writes,
)

KNOWN_TERMINAL = 310400000001
UNKNOWN_TERMINAL = 310400000099
CARDS = [3104000000000001 + i for i in range(6)]


def _reference() -> ReferenceData:
    ref = ReferenceData()
    ref.terminal_operator = {KNOWN_TERMINAL: "SZBUS"}
    ref.account_ids = {"payable:SZBUS": 7}
    ref.terminal_payable = {KNOWN_TERMINAL: 7}
    return ref


def _cards(rng: random.Random) -> dict[int, _Card]:
    cards = {}
    for no in CARDS:
        status = rng.choice([CardStatus.ACTIVE] * 16 + [CardStatus.LOST, CardStatus.BLOCKED])
        cards[no] = _Card(
            int(status),
            rng.choice([0, 150, 20000, 20000, 20000]),
            rng.choice([0, 0, 3, 9]),
            dt.datetime(2026, 11, 22, tzinfo=dt.UTC) if status == CardStatus.LOST else None,
            None,
            rng.choice([1] * 8 + [2]),
            # now and then a loss reported and released since: records are
            # stamped 2026-11-23 07:30, inside the first window, after the second
            rng.choice(
                [None] * 6
                + [
                    (dt.datetime(2026, 11, 23, 7), dt.datetime(2026, 11, 23, 8)),
                    (dt.datetime(2026, 11, 22, 7), dt.datetime(2026, 11, 22, 8)),
                ]
            ),
            # the time of the highest record and online debits made since
            # (records are stamped 07:30): some explain a gap, some are later
            counter_at=rng.choice([None, dt.datetime(2026, 11, 23, 7)]),
            debits=rng.choice(
                [(), (dt.datetime(2026, 11, 23, 7, 10),), (dt.datetime(2026, 11, 23, 8),)]
            ),
        )
    # One card replaced by another: its money follows.
    cards[CARDS[-1]].status = int(CardStatus.BLOCKED)
    cards[CARDS[-1]].replaced_by = CARDS[0]
    return cards


def _batch(rng: random.Random, cards: dict[int, _Card]) -> list[PreparedRecord]:
    running = {no: (c.balance, c.counter) for no, c in cards.items()}
    items = []
    for seq in range(40):
        no = rng.choice(CARDS * 3 + [3104999999999999])  # now and then a card nobody holds
        balance, counter = running.get(no, (0, 0))
        amount = rng.choice([100, 200, 400, 900])
        step = rng.choice([1] * 12 + [0, -1, 3])
        reported = balance if rng.random() < 0.9 else balance + 1
        # now and then a key version other than the card's
        kv = cards[no].key_version if no in cards and rng.random() < 0.95 else 3
        record = OfflineRecord(
            f"{no:016d}",
            amount,
            0x06,
            f"{KNOWN_TERMINAL:012d}",
            seq if rng.random() < 0.9 else max(0, seq - 1),  # some resends of a sequence number
            "20261123073000",
            kv,
            bytes(4),
            max(0, counter + step),
            reported,
        )
        terminal = KNOWN_TERMINAL if rng.random() < 0.98 else UNKNOWN_TERMINAL
        mac = rng.choice([MAC_OK] * 40 + [MAC_BAD, KEY_UNKNOWN])
        if mac == MAC_OK and terminal == KNOWN_TERMINAL and kv != 3:  # what the ledger will post
            running[no] = (balance - amount, max(counter, counter + step))
        fingerprint = bytes([seq % 3])
        items.append(
            PreparedRecord(record, no, terminal, fingerprint, mac, dt.datetime(2026, 11, 23, 7, 30))
        )
    return items


def _earlier(rng: random.Random) -> dict[tuple[int, int], offline_batch._Seen]:
    """Outcomes committed before the batch: online debits (approved or refused), records."""
    seen = {}
    for seq in rng.sample(range(40), 6):
        seen[(KNOWN_TERMINAL, seq)] = (
            bytes([seq % 3]) if rng.random() < 0.7 else b"other content",
            rng.choice([TxnStatus.APPROVED, TxnStatus.INSUFFICIENT_FUNDS, TxnStatus.UNKNOWN_CARD]),
            rng.choice([0, 500]),
            0,
            int(rng.choice([TxnKind.DEBIT, TxnKind.OFFLINE])),
        )
    return seen


@pytest.mark.parametrize("seed", range(200))
def test_usual_path_and_full_path_agree(seed: int) -> None:
    rng = random.Random(seed)
    ref = _reference()
    cards = _cards(rng)
    items = _batch(rng, cards)
    earlier = _earlier(rng)
    # Counters the card used before: only ever at or below its highest
    # (cards.offline_counter), which is what apply_offline_batch asks about.
    used = {
        (no, n) for no, c in cards.items() for n in range(1, c.counter + 1) if rng.random() < 0.3
    }

    states = []
    for decide in (_decide, _decide_in_full):
        c, u, seen, writes = copy.deepcopy(cards), set(used), dict(earlier), _Writes()
        results = [decide(p, seen, c, u, ref, writes) for p in items]
        states.append((results, c, u, seen, dataclasses.asdict(writes)))
    assert states[0] == states[1]


def test_the_usual_path_is_taken_for_usual_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the benchmark's premise: a plain morning record does not fall through."""
    ref = _reference()
    cards = {CARDS[0]: _Card(int(CardStatus.ACTIVE), 1000, 4, None, None, 1)}
    record = OfflineRecord(
        f"{CARDS[0]:016d}",
        200,
        0x06,
        f"{KNOWN_TERMINAL:012d}",
        1,
        "20261123073000",
        1,
        bytes(4),
        5,
        1000,
    )
    p = PreparedRecord(record, CARDS[0], KNOWN_TERMINAL, b"f", MAC_OK, dt.datetime(2026, 11, 23))

    def full_path(*args: object) -> None:
        raise AssertionError("a usual record took the full path")

    monkeypatch.setattr(offline_batch, "_decide_in_full", full_path)
    result = _decide(p, {}, cards, set(), ref, _Writes())
    assert result.balance_after == 800 and cards[CARDS[0]].counter == 5
