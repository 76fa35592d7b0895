"""A card population for load generation: seeded in bulk, signed ahead of time.

Issuing millions of cards through the desk API would take hours, so a load
population is written straight into the database by set-based SQL: cards of
the demo issuer, each with an opening load posted from the issuer's cash,
so the books balance from the first row. Requests are then signed with the
Cython extension's per-call functions (a few microseconds a record), so a load
generator measures the server, not its own crypto.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from onecard.ledger.accounts import cash_code
from onecard.ledger.crypto import _fast
from onecard.ledger.crypto.suites import TYPE_LOAD, TYPE_PURCHASE
from onecard.ledger.devdata import DEMO_ISSUER
from onecard.ledger.keys import KeyVersion
from onecard.ledger.storage import Conn
from onecard.v1 import common_pb2, terminal_pb2, upload_pb2

#: Seeded cards are ``3104 9`` followed by an 11-digit index, apart from cards
#: the desk issues in demos and tests.
BASE_CARD = int(DEMO_ISSUER) * 10**12 + 9 * 10**11
BUS_TERMINALS = ["310400000001", "310400000002", "310400000003"]
METRO_TERMINALS = ["310400000004", "310400000005"]


async def seed_cards(conn: Conn, count: int, balance: int, key_version: int) -> None:
    """``count`` active standard cards with ``balance`` fen each, opening loads posted.

    Idempotent per card number; runs server-side (generate_series), in chunks
    so that one transaction never holds millions of rows of WAL.
    """
    cash = await conn.fetchval(
        "SELECT account_id FROM accounts WHERE code = $1", cash_code(DEMO_ISSUER, "cash")
    )
    chunk = 1_000_000
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        async with conn.transaction():
            added = await conn.fetchval(
                """
                WITH new AS (
                    INSERT INTO cards (card_no, issuer_code, key_version, product_code,
                                       purse_balance)
                    SELECT $1::bigint + i, $4, $5, 'standard', $6
                    FROM generate_series($2::bigint, $3::bigint - 1) AS i
                    ON CONFLICT DO NOTHING
                    RETURNING card_no
                ), posted AS (
                    INSERT INTO postings (card_no, debit_account, credit_account, amount, kind)
                    SELECT card_no, $7, 10000000000000000 + card_no, $6, 2 FROM new
                )
                SELECT count(*) FROM new
                """,
                BASE_CARD,
                start,
                stop,
                DEMO_ISSUER,
                key_version,
                balance,
                cash,
            )
            await conn.execute(
                "UPDATE accounts SET balance = balance - $1 WHERE account_id = $2",
                added * balance,
                cash,
            )
    await conn.execute("ANALYZE cards")


def card_number(index: int) -> str:
    return f"{BASE_CARD + index:016d}"


#: Spreads neighbouring ranks over the card table: 1 / golden ratio.
_SPREAD = (math.sqrt(5) - 1) / 2


def _stride(n: int) -> int:
    """A step coprime to ``n`` near ``n / golden ratio``.

    Coprime, ``rank -> (rank * step + offset) % n`` is a permutation of the
    ``n`` cards whatever ``n`` is; a fixed step was not when ``n`` was its
    multiple (a prime 7919: ``--cards 7919`` drew one card only).
    """
    step = max(1, round(n * _SPREAD))
    while math.gcd(step, n) != 1:
        step += 1  # n - 1 is coprime to n: found below n
    return step


class Zipf:
    """Draws card indexes with popularity ~ 1/rank^s, as in real ridership.

    A few commuters' cards are used many times a day, most a few times a
    month. A precomputed CDF and bisect keep each draw cheap. ``s`` 0 is
    uniform; the larger ``s``, the more draws land on the first ranks.
    """

    def __init__(self, n: int, s: float, rng: random.Random, ranks: int = 100_000) -> None:
        self.n = n
        self.rng = rng
        # Ranks beyond ``ranks`` share the tail uniformly: the CDF stays small.
        top = min(n, ranks)
        # (r + 1) ** -s: 1.0 / (r + 1) ** s overflowed (OverflowError) for a large s
        weights = [(r + 1) ** -s for r in range(top)]
        tail = (n - top) * (top + 1) ** -s if n > top else 0.0
        total = sum(weights) + tail
        acc = 0.0
        self.cdf: list[float] = []
        for w in weights:
            acc += w / total
            self.cdf.append(acc)
        self.top = top
        # A permutation from a random start, so popular cards are spread over the table.
        self.offset = rng.randrange(n)
        self.stride = _stride(n)

    def draw(self) -> int:
        u = self.rng.random()
        rank = bisect.bisect_left(self.cdf, u)
        if rank >= self.top:
            rank = self.top + self.rng.randrange(max(1, self.n - self.top))
        return (rank * self.stride + self.offset) % self.n


@dataclass
class Chip:
    """What the ledger cannot see: the card's own purse and purchase counter."""

    balance: int
    counter: int = 0
    online: int = 0
    key: bytes = field(default=b"", repr=False)


class Population:
    """Signs purchases for seeded cards and keeps each chip's state in step."""

    def __init__(self, version: KeyVersion, count: int, balance: int) -> None:
        self.version = version
        self.count = count
        self.balance = balance
        self.chips: dict[int, Chip] = {}
        self._suite = int(version.suite)
        self._mtk = version.mtk.reveal()

    def chip(self, index: int) -> Chip:
        chip = self.chips.get(index)
        if chip is None:
            key = _fast.derive_card_key(
                self._suite, self._mtk, card_number(index), self.version.kv, _fast.PURPOSE_TAC
            )
            chip = self.chips[index] = Chip(self.balance, key=key)
        return chip

    def tac(self, index: int, amount: int, terminal: str, seq: int, when: str) -> bytes:
        return _fast.purchase_tac(
            self._suite, self.chip(index).key, amount, TYPE_PURCHASE, terminal, seq, when
        )

    def offline_record(
        self, index: int, amount: int, terminal: str, seq: int, when: str
    ) -> upload_pb2.OfflineRecord:
        """The card pays: its purse and counter move, as on the bus."""
        chip = self.chip(index)
        before = chip.balance
        chip.balance -= amount
        chip.counter += 1
        return upload_pb2.OfflineRecord(
            card_number=card_number(index),
            amount=amount,
            transaction_type=TYPE_PURCHASE,
            terminal_id=terminal,
            terminal_seq=seq,
            date_time=when,
            key_version=self.version.kv,
            tac=self.tac(index, amount, terminal, seq, when),
            offline_counter=chip.counter,
            card_balance_before=before,
        )

    def load_request(
        self, index: int, amount: int, terminal: str, seq: int, when: str, random_: bytes
    ) -> terminal_pb2.LoadRequest:
        """A top-up as the machine sends it; the chip is assumed to take the MAC2."""
        chip = self.chip(index)
        load_key = _fast.derive_card_key(
            self._suite,
            self.version.mlk.reveal(),
            card_number(index),
            self.version.kv,
            _fast.PURPOSE_LOAD,
        )
        seslk = _fast.load_session_key(self._suite, load_key, random_, chip.online)
        req = terminal_pb2.LoadRequest(
            card_number=card_number(index),
            amount=amount,
            transaction_type=TYPE_LOAD,
            terminal_id=terminal,
            terminal_seq=seq,
            date_time=when,
            key_version=self.version.kv,
            card_random=random_,
            online_counter=chip.online,
            old_balance=chip.balance,
            mac1=_fast.load_mac1(self._suite, seslk, chip.balance, amount, TYPE_LOAD, terminal),
            payment_channel=common_pb2.PAYMENT_CHANNEL_WECHAT_PAY,
        )
        chip.balance += amount
        chip.online += 1
        return req

    def debit_request(
        self, index: int, amount: int, terminal: str, seq: int, when: str
    ) -> terminal_pb2.DebitRequest:
        """An online debit as a gate sends it; the chip pays, expecting approval."""
        chip = self.chip(index)
        chip.balance -= amount
        chip.counter += 1
        return terminal_pb2.DebitRequest(
            card_number=card_number(index),
            amount=amount,
            transaction_type=TYPE_PURCHASE,
            terminal_id=terminal,
            terminal_seq=seq,
            date_time=when,
            key_version=self.version.kv,
            tac=self.tac(index, amount, terminal, seq, when),
        )


def sequences(start: int) -> Iterator[int]:
    """Terminal sequence numbers from ``start``; each run picks a fresh range."""
    n = start
    while True:
        yield n
        n += 1


#: Load-generator terminals: ``3104 1`` followed by a 7-digit index.
BASE_TERMINAL = 310410000000


async def seed_terminals(conn: Conn, count: int) -> list[str]:
    """``count`` registered terminals, alternately bus validators and metro gates."""
    await conn.execute(
        """
        INSERT INTO terminals (terminal_id, operator_id, kind)
        SELECT $1::bigint + i, CASE WHEN i % 2 = 0 THEN 'SZBUS' ELSE 'SZMETRO' END,
               'load generator'
        FROM generate_series(0, $2::bigint - 1) AS i
        ON CONFLICT DO NOTHING
        """,
        BASE_TERMINAL,
        count,
    )
    return [f"{BASE_TERMINAL + i:012d}" for i in range(count)]
