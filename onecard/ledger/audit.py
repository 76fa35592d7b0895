"""Checks that prove the books: the trial balance and every balance against its postings.

And one that is not about money: each card's ``chip_adjust`` (what its chip
holds beyond its ledger purse, migration 0018) against the purse postings
its chip did not see, so that a move that forgot to keep it shows up as
surely as a lost fen.

Tests run these after every scenario, and the load generator after every run:
money created or lost shows up here, whatever the replies said.
"""

from __future__ import annotations

from dataclasses import dataclass

from onecard.ledger.accounts import CARD_SPACE, DEPOSIT_BASE, PURSE_BASE
from onecard.ledger.model import UNSEEN_BY_CHIP, PostingKind
from onecard.ledger.storage import Conn


async def trial_balance(conn: Conn) -> int:
    """Sum of every account's balance; zero in a sound ledger."""
    total: int = await conn.fetchval(
        """SELECT coalesce((SELECT sum(purse_balance + deposit_balance) FROM cards), 0)
                + coalesce((SELECT sum(balance) FROM accounts), 0)
                + coalesce((SELECT sum(balance) FROM account_slots), 0)"""
    )
    return total


@dataclass(frozen=True)
class Discrepancy:
    account: int
    balance: int
    from_postings: int


async def balance_discrepancies(conn: Conn) -> list[Discrepancy]:
    """Accounts whose stored balance differs from credits minus debits of their postings."""
    rows = await conn.fetch(
        """
        WITH movements AS (
            SELECT credit_account AS account, amount FROM postings
            UNION ALL
            SELECT debit_account, -amount FROM postings
        ), from_postings AS (
            SELECT account, sum(amount) AS total FROM movements GROUP BY account
        ), stored AS (
            SELECT account_id AS account, balance FROM account_balances
            UNION ALL SELECT $1 + card_no, purse_balance FROM cards
            UNION ALL SELECT $2 + card_no, deposit_balance FROM cards
        )
        SELECT coalesce(s.account, f.account) AS account,
               coalesce(s.balance, 0) AS balance,
               coalesce(f.total, 0) AS from_postings
        FROM stored s FULL JOIN from_postings f USING (account)
        WHERE coalesce(s.balance, 0) <> coalesce(f.total, 0)
        ORDER BY 1
        """,
        PURSE_BASE,
        DEPOSIT_BASE,
    )
    return [Discrepancy(r["account"], r["balance"], r["from_postings"]) for r in rows]


async def chip_adjust_discrepancies(conn: Conn) -> list[tuple[int, int, int]]:
    """(card, stored chip_adjust, from postings) for every card where the two differ.

    The SQL twin of ``model.chip_unseen``, which the desk's moves apply one
    posting at a time and the upload batch the same way in bulk.
    """
    rows = await conn.fetch(
        """
        WITH moves AS (
            SELECT debit_account - $1 AS card_no, amount FROM postings
            WHERE kind = ANY($2::smallint[]) AND debit_account BETWEEN $1 AND $1 + $3
            UNION ALL
            SELECT credit_account - $1, -amount FROM postings
            WHERE kind = ANY($2::smallint[]) AND credit_account BETWEEN $1 AND $1 + $3
            UNION ALL
            SELECT card_no, CASE WHEN debit_account = $1 + card_no THEN amount ELSE -amount END
            FROM postings WHERE kind = $4
        ), derived AS (
            SELECT card_no, sum(amount) AS adjust FROM moves GROUP BY card_no
        )
        SELECT c.card_no, c.chip_adjust, coalesce(d.adjust, 0) AS derived
        FROM cards c LEFT JOIN derived d USING (card_no)
        WHERE c.chip_adjust <> coalesce(d.adjust, 0)
        ORDER BY 1
        """,
        PURSE_BASE,
        sorted(int(k) for k in UNSEEN_BY_CHIP),
        CARD_SPACE - 1,
        int(PostingKind.REPLACEMENT_TRANSFER),
    )
    return [(r["card_no"], r["chip_adjust"], r["derived"]) for r in rows]
