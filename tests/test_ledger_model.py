"""The ledger against a model a cashier could check by hand (hypothesis).

Random sequences of loads, debits, forged TACs, retries and conflicting
retries, cut into random batches, go through the ledger's batch calls; a few
lines of Python predict every status and balance. After every sequence the
books must balance and each card must hold what the model says.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onecard.clients.card import SimulatedCard
from onecard.ledger.crypto.verifier import PurchaseCheck, ReferenceVerifier
from onecard.ledger.devdata import seed_demo_data
from onecard.ledger.engine import UPLOAD_COMMITTER, BatchSettings, Ledger
from onecard.ledger.model import (
    CardIssue,
    Debit,
    DeskStatus,
    Load,
    PaymentChannel,
    RecordOutcome,
    TxnResult,
    TxnStatus,
)
from tests.support import assert_books_balance, dev_keys, fetch, new_card_number, wait_until

BUS, TOPUP = "310400000001", "310400000009"
TXN_MAX, PURSE_MAX = 20_000, 50_000  # the demo "senior" product (no deposit)
WHEN = "20261123080000"
_seqs = {BUS: itertools.count(1), TOPUP: itertools.count(1)}


@dataclass
class _Model:
    balances: list[int]
    outcomes: dict[tuple[str, int], tuple[TxnStatus, int]]

    def debit(self, card: int, amount: int, forged: bool) -> tuple[TxnStatus, int]:
        bal = self.balances[card]
        if forged:
            return TxnStatus.MAC_INVALID, 0  # told no balance, claims no identity
        if amount > TXN_MAX:
            return TxnStatus.OVER_LIMIT, bal
        if amount > bal:
            return TxnStatus.INSUFFICIENT_FUNDS, bal
        self.balances[card] = bal - amount
        return TxnStatus.APPROVED, bal - amount

    def load(self, card: int, amount: int) -> tuple[TxnStatus, int]:
        bal = self.balances[card]
        if bal + amount > PURSE_MAX:
            return TxnStatus.OVER_LIMIT, bal
        self.balances[card] = bal + amount
        return TxnStatus.APPROVED, bal + amount


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(db_dsn: str) -> AsyncIterator[Ledger]:
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        await seed_demo_data(conn)
    keys = dev_keys()
    ledger = await Ledger.open(pool, keys, ReferenceVerifier(keys))
    try:
        yield ledger
    finally:
        await ledger.close()
        await pool.close()


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("debit"),
            st.integers(0, 2),
            st.sampled_from([1, 200, 4_000, 19_999, 20_000, 20_001]),
        ),
        st.tuples(st.just("load"), st.integers(0, 2), st.sampled_from([1, 5_000, 25_000])),
        st.tuples(st.just("forged"), st.integers(0, 2), st.just(100)),
        st.tuples(st.just("retry"), st.integers(0, 1_000), st.just(0)),
        st.tuples(st.just("conflict"), st.integers(0, 1_000), st.just(0)),
    ),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=ops, cuts=st.lists(st.integers(1, 40), min_size=1, max_size=6))
async def test_ledger_matches_the_model(
    ledger: Ledger, db_dsn: str, ops: list[tuple[str, int, int]], cuts: list[int]
) -> None:
    keys = dev_keys()
    version = keys.get("3104", 1)
    assert version is not None
    cards = [SimulatedCard(new_card_number(), version) for _ in range(3)]
    for card in cards:
        issued = await ledger.issue_card(
            CardIssue(str(uuid.uuid4()), "model", card.card_no, "senior", 0, 1, PaymentChannel.CASH)
        )
        assert issued.status is DeskStatus.OK
    model = _Model([0, 0, 0], {})

    requests: list[Debit | Load] = []
    originals: list[Debit | Load] = []  # what a retry may repeat (not conflicting copies)
    expected: list[tuple[TxnStatus, int, TxnStatus | None]] = []
    for kind, a, amount in ops:
        if kind in ("retry", "conflict"):
            if not originals:
                continue
            earlier = originals[a % len(originals)]
            first = model.outcomes[(earlier.terminal_id, earlier.terminal_seq)]
            if first[0] is TxnStatus.MAC_INVALID:
                # A forged request took no identity: sent again, or changed
                # (its TAC still does not cover it), it is refused afresh.
                changed = earlier if kind == "retry" else _with_amount(earlier, earlier.amount + 1)
                requests.append(changed)
                expected.append((TxnStatus.MAC_INVALID, 0, None))
            elif kind == "retry":
                requests.append(earlier)
                expected.append((TxnStatus.DUPLICATE, first[1], first[0]))
            elif isinstance(earlier, Debit):
                # A terminal reusing a sequence number for another purchase the
                # card really signed: authentic, but the identity is taken.
                card = next(c for c in cards if c.card_no == earlier.card_no)
                amount = earlier.amount + 1
                tac = card.sign_purchase(amount, BUS, earlier.terminal_seq, WHEN)
                requests.append(
                    Debit(card.card_no, amount, 0x06, BUS, earlier.terminal_seq, WHEN, 1, tac)
                )
                expected.append((TxnStatus.CONFLICT, 0, None))
            else:
                # A load changed on its way: MAC1 no longer covers it.
                requests.append(_with_amount(earlier, earlier.amount + 1))
                expected.append((TxnStatus.MAC_INVALID, 0, None))
            continue
        card = cards[a]
        if kind == "load":
            seq = next(_seqs[TOPUP])
            card.balance = model.balances[a]  # the chip agrees with the ledger
            pending = card.begin_load(amount, TOPUP)
            req: Debit | Load = Load(
                card.card_no, amount, 0x02, TOPUP, seq, WHEN, 1,
                pending.random, pending.online_counter, pending.old_balance, pending.mac1,
                PaymentChannel.CASH,
            )  # fmt: skip
            status, balance = model.load(a, amount)
            if status is TxnStatus.APPROVED:
                card.online_counter += 1
        else:
            seq = next(_seqs[BUS])
            tac = card.sign_purchase(amount, BUS, seq, WHEN)
            if kind == "forged":
                tac = bytes([tac[0] ^ 1]) + tac[1:]
            req = Debit(card.card_no, amount, 0x06, BUS, seq, WHEN, 1, tac)
            status, balance = model.debit(a, amount, kind == "forged")
        model.outcomes[(req.terminal_id, req.terminal_seq)] = (status, balance)
        requests.append(req)
        originals.append(req)
        expected.append((status, balance, None))

    results: list[TxnResult] = []
    start = 0
    for cut in itertools.cycle(cuts):
        if start >= len(requests):
            break
        # Mixed batches of debits and loads, as the group committer forms them.
        results += await ledger.create_debits(requests[start : start + cut])  # type: ignore[arg-type]
        start += cut

    got = [
        (
            r.status,
            r.balance_after if r.status is not TxnStatus.CONFLICT else 0,
            r.original_status,
        )
        for r in results
    ]
    assert got == expected
    views = await ledger.lookup_cards([c.card_no for c in cards])
    assert [v.balance if v else None for v in views] == model.balances
    await assert_books_balance(db_dsn)


def _with_amount(req: Debit | Load, amount: int) -> Debit | Load:
    if isinstance(req, Debit):
        return Debit(
            req.card_no, amount, req.txn_type, req.terminal_id, req.terminal_seq,
            req.date_time, req.key_version, req.tac,
        )  # fmt: skip
    return Load(
        req.card_no, amount, req.txn_type, req.terminal_id, req.terminal_seq, req.date_time,
        req.key_version, req.card_random, req.online_counter, req.old_balance, req.mac1,
        req.channel,
    )  # fmt: skip


async def test_a_full_upload_queue_refuses_before_checking_any_mac(db_dsn: str) -> None:
    """Under an upload surge refusals are most of the traffic: each must cost next to nothing.

    A refused batch used to be MAC-checked and fingerprinted record by record
    before the queue turned it away, CPU the online debits needed.
    """
    from onecard.ledger.batcher import Overloaded
    from onecard.ledger.model import OfflineRecord

    keys = dev_keys()

    class CountingVerifier(ReferenceVerifier):
        checked = 0

        def verify_purchases(self, checks: Sequence[PurchaseCheck]) -> list[int]:
            CountingVerifier.checked += len(checks)
            return super().verify_purchases(checks)

    def records(first_seq: int, n: int) -> list[OfflineRecord]:
        card, when = "3104123456789012", "20261122083015"
        return [
            OfflineRecord(card, 200, 0x06, "310400000001", seq, when, 1, bytes(4), 1, 1_000)
            for seq in range(first_seq, first_seq + n)
        ]

    pool = await asyncpg.create_pool(db_dsn, min_size=2, max_size=2)
    async with pool.acquire() as conn:
        await seed_demo_data(conn)
    batching = BatchSettings(upload_max_queue=10, upload_flushers=1)
    ledger = await Ledger.open(pool, keys, CountingVerifier(keys), batching=batching)
    try:
        # Every connection held: the flusher takes the first batch and waits
        # for one, the second batch fills the queue, the third meets it full.
        held = [await pool.acquire() for _ in range(2)]
        first = asyncio.create_task(ledger.submit_offline_records(records(1, 1)))
        await wait_until(
            lambda: CountingVerifier.checked == 1 and ledger.queued()[UPLOAD_COMMITTER] == 0
        )
        second = asyncio.create_task(ledger.submit_offline_records(records(2, 10)))
        await wait_until(lambda: ledger.queued()[UPLOAD_COMMITTER] == 10)
        with pytest.raises(Overloaded, match="queue is full"):
            await ledger.submit_offline_records(records(12, 10))
        assert CountingVerifier.checked == 11  # the refused batch's MACs were never checked
        assert ledger.queued()[UPLOAD_COMMITTER] == 10  # and nothing of it was queued
        for conn in held:
            await pool.release(conn)
        replies = await first + await second
        assert [r.outcome for r in replies] == [RecordOutcome.QUARANTINED] * 11  # unknown card
    finally:
        await ledger.close()
        await pool.close()
    rows = await fetch(db_dsn, "SELECT count(*) AS n FROM quarantine")
    assert rows[0]["n"] == 11  # the two taken batches, kept; the refused one nowhere
    rows = await fetch(db_dsn, "SELECT count(*) AS n FROM terminal_txns")
    assert rows[0]["n"] == 0
