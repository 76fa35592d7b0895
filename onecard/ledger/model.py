"""The ledger's vocabulary: statuses, kinds and the requests and results of batch calls.

The numbers of every enum here are stored in PostgreSQL and mirrored on the
wire (proto/onecard/v1/common.proto), so they never change meaning.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TxnStatus(enum.IntEnum):
    APPROVED = 1
    INSUFFICIENT_FUNDS = 2
    UNKNOWN_CARD = 3
    CARD_NOT_ACTIVE = 4
    MAC_INVALID = 5
    OVER_LIMIT = 6
    DUPLICATE = 7
    CONFLICT = 8
    UNKNOWN_TERMINAL = 9
    #: Stored for quarantined offline records; online requests with an
    #: unknown key version are refused as malformed instead.
    KEY_UNKNOWN = 10


class CardStatus(enum.IntEnum):
    ACTIVE = 1
    LOST = 2
    BLOCKED = 3
    CLOSED = 4


class TxnKind(enum.IntEnum):
    """What a terminal transaction was; stored in terminal_txns.kind."""

    DEBIT = 1
    LOAD = 2
    OFFLINE = 3


class PostingKind(enum.IntEnum):
    """Why money moved; stored in postings.kind."""

    PURCHASE = 1
    LOAD = 2
    DEPOSIT = 3
    #: A late offline record of a replaced card: the money follows from the
    #: new card's purse to the old one, which the record was posted against.
    REPLACED_CARD_FOLLOW = 4


class PaymentChannel(enum.IntEnum):
    CASH = 1
    BANK_CARD = 2
    ALIPAY = 3
    WECHAT_PAY = 4

    @property
    def code(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Debit:
    """An online purchase authorization, already validated field by field."""

    card_no: str
    amount: int
    txn_type: int
    terminal_id: str
    terminal_seq: int
    date_time: str
    key_version: int
    tac: bytes


@dataclass(frozen=True, slots=True)
class Load:
    """A top-up request, already validated field by field."""

    card_no: str
    amount: int
    txn_type: int
    terminal_id: str
    terminal_seq: int
    date_time: str
    key_version: int
    card_random: bytes
    online_counter: int
    old_balance: int
    mac1: bytes
    channel: PaymentChannel


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Outcome of one Debit or Load, aligned with its request in the batch."""

    status: TxnStatus
    balance_after: int = 0
    mac2: bytes = b""
    original_status: TxnStatus | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Product:
    code: str
    name: str
    deposit: int
    purse_max: int
    txn_max: int


@dataclass(frozen=True, slots=True)
class CardIssue:
    request_id: str
    staff_id: str
    card_no: str
    product: str
    deposit: int
    key_version: int
    channel: PaymentChannel


class DeskStatus(enum.IntEnum):
    OK = 1
    CARD_EXISTS = 2
    CONFLICT = 3


@dataclass(frozen=True, slots=True)
class CardView:
    """A card as the desk sees it."""

    card_no: str
    issuer: str
    key_version: int
    product: str
    status: CardStatus
    balance: int
    deposit: int
    online_counter: int
    offline_counter: int
    issued_at: str
    last_used_at: str


@dataclass(frozen=True, slots=True)
class DeskResult:
    status: DeskStatus
    card: CardView | None = None
    detail: str = ""


class RecordOutcome(enum.IntEnum):
    """What became of one uploaded offline record (upload.proto RecordOutcome)."""

    POSTED = 1
    DUPLICATE = 2
    QUARANTINED = 3
    POSTED_WITH_EXCEPTION = 4
    CONFLICT = 5


class QuarantineReason(enum.IntEnum):
    TAC_INVALID = 1
    KEY_VERSION_UNKNOWN = 2
    UNKNOWN_CARD = 3
    UNKNOWN_TERMINAL = 4


class RecordException(enum.IntEnum):
    """Why finance must look at a posted offline record; stored as bit ``1 << value``."""

    CARD_LOST = 1
    CARD_BLOCKED = 2
    NEGATIVE_BALANCE = 3
    BALANCE_MISMATCH = 4
    COUNTER_GAP = 5
    COUNTER_REPEAT = 6


def exception_bits(exceptions: tuple[RecordException, ...]) -> int:
    bits = 0
    for e in exceptions:
        bits |= 1 << int(e)
    return bits


def exceptions_of(bits: int) -> tuple[RecordException, ...]:
    return tuple(e for e in RecordException if bits & (1 << int(e)))


@dataclass(frozen=True, slots=True)
class OfflineRecord:
    """A purchase the card made while the terminal was offline, already validated."""

    card_no: str
    amount: int
    txn_type: int
    terminal_id: str
    terminal_seq: int
    date_time: str
    key_version: int
    tac: bytes
    offline_counter: int
    card_balance_before: int


@dataclass(frozen=True, slots=True)
class OfflineResult:
    """Outcome of one offline record, aligned with it in its upload batch."""

    outcome: RecordOutcome
    balance_after: int = 0
    original_outcome: RecordOutcome | None = None
    quarantine_reason: QuarantineReason | None = None
    exceptions: tuple[RecordException, ...] = ()
