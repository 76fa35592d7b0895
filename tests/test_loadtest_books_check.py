"""The load generator's check of the books catches each way a ledger can be wrong.

A real run against a real server, then its database is corrupted the way a
bug would leave it (the append-only trigger set aside), and the check must
name what is wrong: the acknowledged identities alone, counted, cannot see a
posting with the wrong amount, a refused request posted anyway, or a purse
changed twice for one posting.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from onecard.clients.loadtest import (
    POSTED,
    REFUSED,
    BooksCheck,
    Expectation,
    Op,
    add_arguments,
    build_ops,
    check_database,
    expectations,
    run,
    run_ops,
)
from onecard.clients.population import BASE_CARD, Population, seed_cards, seed_terminals
from onecard.ledger.accounts import PURSE_BASE
from onecard.ledger.devdata import DEMO_ISSUER
from onecard.ledger.model import PostingKind
from onecard.server.app import RunningServer
from onecard.v1 import upload_pb2
from tests.support import dev_keys

CARDS = 60


@dataclass
class Run:
    dsn: str
    expected: list[Expectation]
    since: object
    refused_debit: Expectation
    refused_record: Expectation


async def _real_run(server: RunningServer) -> Run:
    """A mixed run, plus an online debit the purse cannot pay and a record with a bad TAC."""
    version = dev_keys().get(DEMO_ISSUER, 2)
    assert version is not None
    conn = await asyncpg.connect(server.dsn)
    try:
        # one card more than the run draws from: the refused debit's, untouched otherwise
        await seed_cards(conn, CARDS + 1, 20_000, version.kv)
        terminals = await seed_terminals(conn, 4)
        since = await conn.fetchval("SELECT now()")
    finally:
        await conn.close()
    pop = Population(version, CARDS, 20_000)
    mix = {"debit": 6, "load": 1, "upload": 3}
    ops = build_ops(pop, terminals, mix, 60, 5, 0, "steady", 1.0, 3)
    when = time.strftime("%Y%m%d%H%M%S")
    seq = 3_999_999_999
    spare = Population(version, CARDS + 1, 20_000)
    ops.append(Op("debit", 0, spare.debit_request(CARDS, 45_000, terminals[0], seq, when)))
    # Refused: the gate stays shut and the chip keeps its purse and counter.
    spare.chip(CARDS).balance += 45_000
    spare.chip(CARDS).counter -= 1
    record = spare.offline_record(CARDS, 100, terminals[1], seq, when)
    record.tac = bytes(b ^ 0xFF for b in record.tac)
    batch = upload_pb2.UploadBatch(
        batch_id="bad-tac", records=[record], claimed_count=1, claimed_total=100
    )
    ops.append(Op("upload", 0, batch))
    report = await run_ops(server.address, ops, 0, 4)
    assert not report.unanswered, report.errors
    assert report.outcomes["debit INSUFFICIENT_FUNDS"] >= 1, report.outcomes
    assert report.outcomes["upload QUARANTINED"] >= 1, report.outcomes
    expected = expectations(report)
    refused_debit = next(e for e in expected if e[:2] == (int(terminals[0]), seq))
    refused_record = next(e for e in expected if e[:2] == (int(terminals[1]), seq))
    assert refused_debit[5] == refused_record[5] == REFUSED
    return Run(server.dsn, expected, since, refused_debit, refused_record)


async def _tamper(dsn: str, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Writes what no ledger code path should: postings changed in place, balances by hand."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("ALTER TABLE postings DISABLE TRIGGER postings_append_only")
            for sql, args in statements:
                await conn.execute(sql, *args)
            await conn.execute("ALTER TABLE postings ENABLE TRIGGER postings_append_only")
    finally:
        await conn.close()


def _move(account: int, delta: int) -> tuple[str, tuple[object, ...]]:
    """A balance change on a card purse or a system account, keeping postings aside."""
    if account >= PURSE_BASE:
        return (
            "UPDATE cards SET purse_balance = purse_balance + $1 WHERE card_no = $2",
            (delta, account - PURSE_BASE),
        )
    return ("UPDATE accounts SET balance = balance + $1 WHERE account_id = $2", (delta, account))


async def _posting(dsn: str, expected: Expectation) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT * FROM postings WHERE terminal_id = $1 AND terminal_seq = $2",
            expected[0],
            expected[1],
        )
        assert row is not None
        return row
    finally:
        await conn.close()


def _acknowledged(run: Run, kind: PostingKind) -> Expectation:
    return next(e for e in run.expected if e[5] == POSTED and e[4] == kind)


async def _check(run: Run) -> BooksCheck:
    return await check_database(run.dsn, run.expected, run.since)  # type: ignore[arg-type]


async def test_a_clean_run_passes_with_its_refusals_counted(server: RunningServer) -> None:
    run = await _real_run(server)
    check = await _check(run)
    assert check.ok, check.lines()
    assert check.acknowledged > 0 and check.refused >= 2
    assert check.lines()[0].startswith("books: consistent")


async def test_a_posting_with_another_amount_is_reported_though_the_balances_agree(
    server: RunningServer,
) -> None:
    run = await _real_run(server)
    debit = _acknowledged(run, PostingKind.PURCHASE)
    p = await _posting(run.dsn, debit)
    extra = p["amount"] * 9
    await _tamper(
        run.dsn,
        (
            "UPDATE postings SET amount = amount + $1 WHERE posting_id = $2",
            (extra, p["posting_id"]),
        ),
        _move(p["debit_account"], -extra),
        _move(p["credit_account"], extra),
    )
    check = await _check(run)
    assert not check.ok
    assert check.problems["wrong"] == 1
    assert (check.trial_balance, check.discrepancies) == (0, 0)
    assert f"seq {debit[1]}" in "\n".join(check.lines())
    assert check.as_json()["wrong"] == 1 and check.as_json()["ok"] is False


async def test_a_load_posted_the_wrong_way_round_is_reported(server: RunningServer) -> None:
    run = await _real_run(server)
    load = _acknowledged(run, PostingKind.LOAD)
    p = await _posting(run.dsn, load)
    amount = p["amount"]
    await _tamper(
        run.dsn,
        (
            "UPDATE postings SET debit_account = credit_account, credit_account = debit_account "
            "WHERE posting_id = $1",
            (p["posting_id"],),
        ),
        _move(p["credit_account"], -2 * amount),
        _move(p["debit_account"], 2 * amount),
    )
    check = await _check(run)
    assert check.problems["wrong"] == 1
    assert (check.trial_balance, check.discrepancies) == (0, 0)


async def test_a_posting_on_another_card_is_reported(server: RunningServer) -> None:
    run = await _real_run(server)
    debit = _acknowledged(run, PostingKind.PURCHASE)
    p = await _posting(run.dsn, debit)
    other = BASE_CARD + CARDS  # the spare card, which no acknowledged request paid from
    await _tamper(
        run.dsn,
        (
            "UPDATE postings SET card_no = $1, debit_account = $2 WHERE posting_id = $3",
            (other, PURSE_BASE + other, p["posting_id"]),
        ),
        _move(p["debit_account"], p["amount"]),
        _move(PURSE_BASE + other, -p["amount"]),
    )
    check = await _check(run)
    assert check.problems["wrong"] == 1
    assert (check.trial_balance, check.discrepancies) == (0, 0)


@pytest.mark.parametrize("which", ["refused_debit", "refused_record"])
async def test_a_posting_under_a_refused_identity_is_reported(
    server: RunningServer, which: str
) -> None:
    """INSUFFICIENT_FUNDS online, QUARANTINED offline: the answer said nothing was posted."""
    run = await _real_run(server)
    refused: Expectation = getattr(run, which)
    terminal, seq, card, amount = refused[:4]
    payable = (await _posting(run.dsn, _acknowledged(run, PostingKind.PURCHASE)))["credit_account"]
    await _tamper(
        run.dsn,
        (
            "INSERT INTO postings (card_no, debit_account, credit_account, amount, kind, "
            "terminal_id, terminal_seq) VALUES ($1, $2, $3, $4, 1, $5, $6)",
            (card, PURSE_BASE + card, payable, amount, terminal, seq),
        ),
        _move(PURSE_BASE + card, -amount),
        _move(payable, amount),
    )
    check = await _check(run)
    assert check.problems["refused_posted"] == 1
    assert (check.trial_balance, check.discrepancies) == (0, 0)
    assert f"terminal {terminal} seq {seq}" in "\n".join(check.lines())


async def test_a_purse_changed_twice_for_one_posting_is_reported(server: RunningServer) -> None:
    """Postings right, trial balance zero: only balances against postings show it."""
    run = await _real_run(server)
    p = await _posting(run.dsn, _acknowledged(run, PostingKind.PURCHASE))
    await _tamper(
        run.dsn, _move(p["debit_account"], -p["amount"]), _move(p["credit_account"], p["amount"])
    )
    check = await _check(run)
    assert not any(check.problems.values()) and check.trial_balance == 0
    assert check.discrepancies == 2
    assert f"account {p['debit_account']}" in "\n".join(check.lines())
    assert check.lines()[0].startswith("books: NOT CONSISTENT")


async def test_money_created_from_nothing_fails_the_trial_balance(server: RunningServer) -> None:
    run = await _real_run(server)
    p = await _posting(run.dsn, _acknowledged(run, PostingKind.PURCHASE))
    await _tamper(run.dsn, _move(p["debit_account"], 1))
    check = await _check(run)
    assert check.trial_balance == 1 and check.discrepancies == 1 and not check.ok


async def test_an_acknowledged_posting_lost_or_doubled_is_reported(server: RunningServer) -> None:
    run = await _real_run(server)
    purchases = [e for e in run.expected if e[5] == POSTED and e[4] == PostingKind.PURCHASE]
    lost, doubled = [await _posting(run.dsn, e) for e in purchases[:2]]
    await _tamper(
        run.dsn,
        ("DELETE FROM postings WHERE posting_id = $1", (lost["posting_id"],)),
        _move(lost["debit_account"], lost["amount"]),
        _move(lost["credit_account"], -lost["amount"]),
        (
            "INSERT INTO postings (card_no, debit_account, credit_account, amount, kind, "
            "terminal_id, terminal_seq) SELECT card_no, debit_account, credit_account, amount, "
            "kind, terminal_id, terminal_seq FROM postings WHERE posting_id = $1",
            (doubled["posting_id"],),
        ),
        _move(doubled["debit_account"], -doubled["amount"]),
        _move(doubled["credit_account"], doubled["amount"]),
    )
    check = await _check(run)
    assert (check.problems["missing"], check.problems["doubled"]) == (1, 1)
    assert (check.trial_balance, check.discrepancies) == (0, 0)


async def test_the_command_exits_non_zero_when_the_books_are_wrong(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    report_file = tmp_path / "r.json"
    args = p.parse_args(
        ["--target", server.address, "--dsn", server.dsn, "--cards", "50", "--terminals", "4",
         "--count", "40", "--batch", "5", "--json", str(report_file)]
    )  # fmt: skip
    assert await run(args) == 0
    conn = await asyncpg.connect(server.dsn)
    try:  # one seeded purse off by a yuan: the next run's check must fail on it
        await conn.execute(
            "UPDATE cards SET purse_balance = purse_balance + 100 WHERE card_no = $1", BASE_CARD
        )
    finally:
        await conn.close()
    assert await run(args) == 1
    check = json.loads(report_file.read_text())["check"]
    assert check["ok"] is False
    assert (check["trial_balance"], check["balance_discrepancies"]) == (100, 1)
    assert "books: NOT CONSISTENT" in capsys.readouterr().out
