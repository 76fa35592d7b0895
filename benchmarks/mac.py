"""Purchase-TAC verification throughput: the Cython/OpenSSL path against the Python twin.

Run from the project root (after ``pip install -e .``)::

    python -m benchmarks.mac [--records 100000] [--cards 10000] [--reference-records 5000]

Per suite, ``--records`` purchase records spread at random over ``--cards``
cards are verified in one batch by ``FastVerifier``: cold (the derived-key
cache just cleared, so every card key is derived once) and warm (the same
batch again after a warm-up run; best of ``--repeat``), and cold on
``--cards`` records each for a card not seen before (one derivation per
record). The pure-Python
``ReferenceVerifier`` is timed the same ways on the first
``--reference-records`` records only, and reported per record. The last
lines are one per suite::

    mac <suite>: <N> ns/record fast, <M> ns/record reference, <R>x

with N and M the warm-cache figures.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from onecard.ledger.crypto import fast
from onecard.ledger.crypto.suites import TYPE_COMPOUND_PURCHASE, TYPE_PURCHASE, Suite
from onecard.ledger.crypto.verifier import MAC_OK, PurchaseCheck, ReferenceVerifier
from onecard.ledger.keys import KeyVersion, MasterKey, MemoryKeyStore

ISSUER = "3104"
KV = 1


class Timing(NamedTuple):
    impl: str
    cache: str
    records: int
    seconds: float

    @property
    def ns_per_record(self) -> float:
        return self.seconds * 1e9 / self.records


def make_records(
    suite: Suite, keys: MemoryKeyStore, n_records: int, n_cards: int, rng: random.Random
) -> list[PurchaseCheck]:
    """Valid purchases (TACs computed with the extension's per-call path), cards in random order."""
    from onecard.ledger.crypto import _fast

    version = keys.get(ISSUER, KV)
    assert version is not None
    cards: set[str] = set()
    while len(cards) < n_cards:
        cards.add(f"{ISSUER}{rng.randrange(10**12):012d}")
    card_keys = {
        c: _fast.derive_card_key(suite, version.mtk.reveal(), c, KV, _fast.PURPOSE_TAC)
        for c in cards
    }
    card_list = sorted(cards)
    terminals = [f"3104{rng.randrange(10**8):08d}" for _ in range(200)]
    seqs = dict.fromkeys(terminals, 0)
    # every card gets its share of records; the batch visits them in random order
    order = [card_list[i % n_cards] for i in range(n_records)]
    rng.shuffle(order)
    out: list[PurchaseCheck] = []
    for card in order:
        terminal = rng.choice(terminals)
        seqs[terminal] += 1
        amount = rng.randrange(1, 1_000_00)
        txn_type = TYPE_PURCHASE if rng.random() < 0.8 else TYPE_COMPOUND_PURCHASE
        when = (
            f"2026{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
            f"{rng.randrange(24):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
        )
        tac = _fast.purchase_tac(
            suite, card_keys[card], amount, txn_type, terminal, seqs[terminal], when
        )
        out.append(
            PurchaseCheck(ISSUER, KV, card, amount, txn_type, terminal, seqs[terminal], when, tac)
        )
    return out


def _timed(run: Callable[[], list[int]], n: int) -> float:
    start = time.perf_counter()
    result = run()
    elapsed = time.perf_counter() - start
    if result != [MAC_OK] * n:
        raise SystemExit("benchmark records did not all verify: the two paths disagree")
    return elapsed


def measure(
    impl: str,
    verifier: fast.FastVerifier | ReferenceVerifier,
    records: Sequence[PurchaseCheck],
    repeat: int,
) -> list[Timing]:
    n = len(records)

    def run() -> list[int]:
        return verifier.verify_purchases(records)

    cold = []
    for _ in range(repeat):
        verifier.clear_cache()
        cold.append(_timed(run, n))
    # the last cold run has warmed the cache
    warm = [_timed(run, n) for _ in range(repeat)]
    return [Timing(impl, "warm", n, min(warm)), Timing(impl, "cold", n, min(cold))]


def bench_suite(suite: Suite, args: argparse.Namespace) -> tuple[Timing, Timing]:
    rng = random.Random(args.seed + int(suite))
    keys = MemoryKeyStore(
        [
            KeyVersion(
                ISSUER,
                KV,
                suite,
                MasterKey(os.urandom(16), "MTK"),
                MasterKey(os.urandom(16), "MLK"),
            )
        ]
    )
    records = make_records(suite, keys, args.records, args.cards, rng)
    sample = records[: args.reference_records or len(records)]
    fast_v = fast.FastVerifier(keys, cache_size=args.cache_size)
    ref_v = ReferenceVerifier(keys, cache_size=args.cache_size)
    if fast_v.verify_purchases(sample) != ref_v.verify_purchases(sample):
        raise SystemExit(f"{suite.label}: fast and reference verifiers disagree")
    rows = measure("fast", fast_v, records, args.repeat)
    # every record a card not seen before: the price of one derivation per record
    fresh = make_records(suite, keys, args.cards, args.cards, rng)
    rows.append(measure("fast", fast_v, fresh, args.repeat)[1]._replace(cache="cold, 1/card"))
    rows += measure("reference", ref_v, sample, max(1, args.repeat // 3))
    distinct = len({r.card_no for r in records})
    ref_distinct = len({r.card_no for r in sample})
    print(f"\n{suite.label}: {len(records):,} purchase records over {distinct:,} cards")
    print(f"  {'implementation':<16}{'key cache':<14}{'records':>9}{'ms':>11}{'ns/record':>12}")
    for t in rows:
        print(
            f"  {t.impl:<16}{t.cache:<14}{t.records:>9,}{t.seconds * 1e3:>11.1f}"
            f"{t.ns_per_record:>12,.0f}"
        )
    if len(sample) < len(records):
        print(
            f"  (reference timed on the first {len(sample):,} records only,"
            f" {ref_distinct:,} cards, and reported per record)"
        )
    return rows[0], rows[3]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.mac", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument(
        "--reference-records",
        type=int,
        default=None,
        help="records the pure-Python twin verifies (default: all of --records)",
    )
    parser.add_argument("--cache-size", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=20261122)
    parser.add_argument("--suite", choices=[s.label for s in Suite], action="append")
    args = parser.parse_args(argv)
    reason = fast.unavailable_reason()
    if reason is not None:
        print(f"fast path unavailable: {reason}", file=sys.stderr)
        return 2
    from onecard.ledger.crypto import _fast

    print(f"{_fast.openssl_version()}; Python {sys.version.split()[0]}")
    suites = [Suite.from_label(s) for s in args.suite] if args.suite else list(Suite)
    results = [(suite, *bench_suite(suite, args)) for suite in suites]
    print()
    for suite, f, r in results:
        print(
            f"mac {suite.label}: {round(f.ns_per_record)} ns/record fast, "
            f"{round(r.ns_per_record)} ns/record reference, "
            f"{r.ns_per_record / f.ns_per_record:.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
