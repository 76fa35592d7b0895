"""Requests and results of the desk's card lifecycle, and the rules of the road between states.

A card moves ACTIVE -> LOST (report loss) -> ACTIVE (release); ACTIVE or
LOST -> BLOCKED for good when it is replaced (the old card names its
successor); ACTIVE or LOST -> CLOSED when it is cancelled. Nothing leaves
BLOCKED or CLOSED. Each action states the card's status it needs; any other
answers WRONG_STATE with what would be allowed, never an exception.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field

from onecard.ledger.crypto.encoding import FieldError, parse_datetime
from onecard.ledger.model import CardStatus, CardView, DeskStatus, PaymentChannel
from onecard.ledger.validation import check_digits

#: Who the refund job writes into the audit log.
REFUND_JOB_STAFF = "system:refund-job"


@dataclass(frozen=True)
class DeskSettings:
    #: Seconds a refund without the card in hand waits for late offline records.
    refund_hold: float = 7 * 24 * 3600.0
    #: Seconds between runs of the job that pays refunds whose hold is over (0: never).
    refund_job_interval: float = 60.0
    #: Seconds after which a terminal can no longer reverse its transaction.
    reversal_window: float = 600.0
    #: Most history entries in one page.
    max_page_size: int = 500
    #: Secret for holder digests; None makes one per process (tests, tools).
    pii_key: bytes | None = field(default=None, repr=False)  # a secret


class ReplaceReason(enum.IntEnum):
    LOST = 1
    DAMAGED = 2


@dataclass(frozen=True, slots=True)
class CardAction:
    """Report loss or release it: who, which card, the holder's ID when registered."""

    request_id: str
    staff_id: str
    card_no: str
    holder_id_number: str = field(default="", repr=False)  # personal data


@dataclass(frozen=True, slots=True)
class Replacement:
    request_id: str
    staff_id: str
    card_no: str
    new_card_no: str
    key_version: int
    reason: ReplaceReason
    holder_id_number: str = field(default="", repr=False)  # personal data


@dataclass(frozen=True, slots=True)
class Cancellation:
    request_id: str
    staff_id: str
    card_no: str
    channel: PaymentChannel
    #: The card is at the desk and its chip was read; else the refund is held.
    card_readable: bool
    #: The chip's purse balance (fen) when readable.
    card_balance: int = 0
    holder_id_number: str = field(default="", repr=False)  # personal data


@dataclass(frozen=True, slots=True)
class DisputeRefund:
    request_id: str
    staff_id: str
    card_no: str
    posting_id: int
    amount: int
    case_reference: str
    reason: str


@dataclass(frozen=True, slots=True)
class Reversal:
    """A terminal undoing its own last transaction; seq is the reversal's own.

    ``staff``: who did it, when a clerk reverses from the desk tool (the
    audit log names them); empty for a terminal's own reversal.
    """

    card_no: str
    amount: int
    terminal_id: str
    terminal_seq: int
    original_seq: int
    date_time: str
    staff: str = ""


@dataclass(frozen=True, slots=True)
class DeskOutcome:
    """What a lifecycle action answered; stored whole so a retry gets the same."""

    status: DeskStatus
    card: CardView | None = None
    detail: str = ""
    new_card: CardView | None = None
    #: Fen the action moved: refunded, transferred, paid out.
    amount: int = 0
    posting_id: int = 0


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    card_no: str
    since: str = ""
    until: str = ""
    page_size: int = 50
    page_token: str = ""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    posting_id: int
    posted_at: str
    kind: int
    #: "purse" or "deposit": which of the card's accounts moved
    account: str
    #: Signed from the card's side: positive into the card, negative out.
    amount: int
    counterparty: str
    terminal_id: str
    terminal_seq: int
    corrects: int


@dataclass(frozen=True, slots=True)
class HistoryPage:
    entries: tuple[HistoryEntry, ...]
    next_page_token: str


def wrong_state(card: CardView | None, action: str, allowed: tuple[CardStatus, ...]) -> str:
    assert card is not None
    want = " or ".join(s.name.lower() for s in allowed)
    extra = f" (replaced by {card.replaced_by})" if card.replaced_by else ""
    return f"card {card.card_no} is {card.status.name.lower()}{extra}; {action} needs a {want} card"


def check_text(value: str, field: str, most: int) -> None:
    if not value.strip() or len(value) > most or not value.isprintable():
        raise FieldError(field, f"must be 1 to {most} printable characters")


def check_rfc3339(value: str, field: str) -> None:
    if not value:
        return
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise FieldError(field, "must be an RFC 3339 time like 2026-11-22T08:30:00+08:00") from None
    if parsed.tzinfo is None:
        raise FieldError(field, "must carry a UTC offset (…Z or …+08:00)")
    try:
        # The database compares in UTC; 9999-12-31T23:00:00-05:00 is past year 9999 there.
        parsed.astimezone(dt.UTC)
    except OverflowError:
        raise FieldError(field, "must fall within years 1 to 9999 in UTC") from None


def check_reversal(r: Reversal) -> None:
    check_digits(r.card_no, 16, "card_number")
    check_digits(r.terminal_id, 12, "terminal_id")
    if r.amount <= 0:
        raise FieldError("amount", f"must be a positive number of fen, got {r.amount}")
    if r.original_seq <= 0 or r.original_seq >= r.terminal_seq:
        raise FieldError(
            "original_seq", "must be a positive seq below the reversal's own terminal_seq"
        )
    parse_datetime(r.date_time, "date_time")
