"""Checks that prove the books: the trial balance and every balance against its postings.

Tests run these after every scenario, and the load generator after every run:
money created or lost shows up here, whatever the replies said.
"""

from __future__ import annotations

from dataclasses import dataclass

from onecard.ledger.accounts import DEPOSIT_BASE, PURSE_BASE
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
