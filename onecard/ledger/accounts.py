"""Account identities.

System accounts (cash by channel, operator payables) are rows in the
``accounts`` table with ids below 10^16. A card's two accounts live on its own
row, so that the hot path updates one row per card; their ids are derived so
postings can still name both sides of every movement as plain integers:
``1`` followed by the 16-digit card number is the purse, ``2`` followed by it
is the deposit. Read in decimal, the leading digit names the account kind.
"""

from __future__ import annotations

CARD_SPACE = 10**16
PURSE_BASE = 1 * CARD_SPACE
DEPOSIT_BASE = 2 * CARD_SPACE


def purse_account(card_no: int) -> int:
    return PURSE_BASE + card_no


def deposit_account(card_no: int) -> int:
    return DEPOSIT_BASE + card_no


def cash_code(issuer: str, channel_code: str) -> str:
    """The issuer's cash received through one payment channel."""
    return f"cash:{issuer}:{channel_code}"


def payable_code(operator_id: str) -> str:
    """What the issuer owes an operator for rides and purchases on its terminals."""
    return f"payable:{operator_id}"
