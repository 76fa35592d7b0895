"""The open-loop schedule: --rate is the mean and --duration the length, whatever the profile.

The rush profile used to treat --rate as its base and run at twice it, so a
rush run lasted half the --duration it was given.
"""

from __future__ import annotations

import itertools

import pytest

from onecard.clients.loadtest import RUSH_SWING, _profile_times

RATE, SECONDS = 1_000.0, 6.0
N = int(RATE * SECONDS)


@pytest.mark.parametrize("profile", ["steady", "rush"])
def test_a_run_lasts_its_duration_at_its_mean_rate(profile: str) -> None:
    times = _profile_times(N, RATE, profile)
    assert len(times) == N
    assert times[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(times))
    # the last request is due one gap before the end: at the lowest rate, 2 / RATE for rush
    assert SECONDS - 2.5 / RATE < times[-1] < SECONDS
    assert (N - 1) / times[-1] == pytest.approx(RATE, rel=0.01)


def test_the_rush_peak_is_a_multiple_of_the_mean_in_the_middle() -> None:
    times = _profile_times(N, RATE, "rush")

    def rate_around(t: float) -> float:
        window = [x for x in times if t - 0.05 <= x < t + 0.05]
        return len(window) / 0.1

    assert rate_around(SECONDS / 2) == pytest.approx(RATE * (1 + RUSH_SWING), rel=0.03)
    assert rate_around(0.05) == pytest.approx(RATE * (1 - RUSH_SWING), rel=0.03)
    assert rate_around(SECONDS - 0.05) == pytest.approx(RATE * (1 - RUSH_SWING), rel=0.03)
    first_half = sum(1 for x in times if x < SECONDS / 2)
    assert first_half == pytest.approx(N / 2, abs=1)


def test_closed_loop_has_no_schedule() -> None:
    assert _profile_times(3, 0, "rush") == [0.0, 0.0, 0.0]


def test_no_card_is_topped_up_twice_within_the_load_gap() -> None:
    """Two loads of one card in flight could arrive in the other order.

    The ledger then answers the earlier one STALE_COUNTER (the later counter
    came first), a refusal no real card meets: in a run with s = 1 skew, where
    the popular cards run dry and their holders top up, a quarter of the loads
    were refused so. A card is at one machine at a time.
    """
    from onecard.clients.loadtest import LOAD_GAP, build_ops
    from onecard.clients.population import Population
    from tests.support import dev_keys

    version = dev_keys().get("3104", 1)
    assert version is not None
    pop = Population(version, 2_000, 1_000)  # little money: cards run dry and top up
    terminals = [f"3104000{i:05d}" for i in range(4)]
    ops = build_ops(pop, terminals, {"debit": 8, "load": 1, "upload": 1}, 20_000, 5, 2_000.0,
                    "rush", 1.0, 7)  # fmt: skip
    last: dict[str, float] = {}
    loads = 0
    for op in ops:
        if op.kind != "load":
            continue
        loads += 1
        card = op.request.card_number
        assert op.at - last.get(card, -LOAD_GAP) >= LOAD_GAP, card
        last[card] = op.at
    assert loads > 500  # the case it is about: many dry cards topping up


@pytest.mark.parametrize("cards", [7_919, 79_190])
def test_every_card_of_the_population_can_be_drawn(cards: int) -> None:
    """Zipf.draw mapped a rank to a card by (rank * 7919 + offset) % n, a permutation
    only when n was no multiple of 7919: with --cards 7919 every request of the run
    went to one card, with --cards 79190 to ten (found by review)."""
    import random
    from collections import Counter

    from onecard.clients.population import Zipf

    zipf = Zipf(cards, 1.0, random.Random(1))
    drawn = Counter(zipf.draw() for _ in range(20_000))
    # s = 1 over this many cards: the top card carries ~10%, thousands of cards are drawn
    assert len(drawn) > 1_000, f"{cards} cards, but only {len(drawn)} ever drawn"
    assert drawn.most_common(1)[0][1] < 0.5 * 20_000
    every_rank = {(r * zipf.stride + zipf.offset) % cards for r in range(cards)}
    assert len(every_rank) == cards
    same_seed = [Zipf(cards, 1.0, random.Random(1)) for _ in range(2)]
    assert [same_seed[0].draw() for _ in range(100)] == [same_seed[1].draw() for _ in range(100)]


@pytest.mark.parametrize(("cards", "balance", "count"), [(1_000, 20_000, 400), (100, 1_000, 50)])
def test_upload_batches_hold_the_records_asked_for(cards: int, balance: int, count: int) -> None:
    """--batch N is records per upload batch, but a record whose card's chip could
    not pay was skipped (uploads never topped up, unlike debits): with the Zipf
    draw the batches shrank as the popular cards emptied (55 records of 100 in a
    default run), and a batch left with none was dropped, so a run built fewer
    requests than --count. Another rider's card is drawn now, and when none can
    pay, a holder tops up in the slot (found by review)."""
    from onecard.clients.loadtest import build_ops
    from onecard.clients.population import Population
    from tests.support import dev_keys

    version = dev_keys().get("3104", 2)
    assert version is not None
    pop = Population(version, cards, balance)
    terminals = ["310410000000", "310410000001"]
    ops = build_ops(pop, terminals, {"upload": 1}, count, 100, 0, "steady", 1.0, 1, 0)
    assert len(ops) == count, f"--count {count}, {len(ops)} requests built"
    uploads = [op for op in ops if op.kind == "upload"]
    assert uploads and all(op.records == len(op.request.records) == 100 for op in uploads)
    # no chip pays what it does not hold
    assert all(r.card_balance_before >= r.amount for op in uploads for r in op.request.records)
    if balance * cards < count * 100 * 100:  # the population cannot pay for the rides alone
        assert {op.kind for op in ops} == {"upload", "load"}
