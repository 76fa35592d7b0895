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


class CardStatus(enum.IntEnum):
    ACTIVE = 1
    LOST = 2
    BLOCKED = 3
    CLOSED = 4


class TxnKind(enum.IntEnum):
    """What a terminal transaction was; stored in terminal_txns.kind."""

    DEBIT = 1
    LOAD = 2


class PostingKind(enum.IntEnum):
    """Why money moved; stored in postings.kind."""

    PURCHASE = 1
    LOAD = 2
    DEPOSIT = 3


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
