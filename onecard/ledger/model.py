"""The ledger's vocabulary: statuses, kinds and the requests and results of batch calls.

The numbers of every enum here are stored in PostgreSQL and mirrored on the
wire (proto/onecard/v1/common.proto), so they never change meaning.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


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
    #: A reversal whose original is not the terminal's last approved
    #: transaction, is outside the reversal window, or does not match.
    NOT_REVERSIBLE = 11
    #: The original was reversed before (by another reversal request).
    ALREADY_REVERSED = 12
    #: A load whose MAC1 (online counter and card random) an earlier load used,
    #: approved or refused, or whose counter is below the last approved load's.
    STALE_COUNTER = 13


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
    #: A terminal undoing its own last transaction (a cashier's mistake).
    REVERSAL = 4


class PostingKind(enum.IntEnum):
    """Why money moved; stored in postings.kind."""

    PURCHASE = 1
    LOAD = 2
    DEPOSIT = 3
    #: A late offline record of a replaced card: the money follows from the
    #: new card's purse to the old one, which the record was posted against.
    REPLACED_CARD_FOLLOW = 4
    #: Replacement (补换卡): the old card's purse moves to the new card.
    REPLACEMENT_TRANSFER = 5
    #: Replacement: the old card's deposit moves to the new card.
    DEPOSIT_TRANSFER = 6
    #: Cancellation (退卡): the purse paid out through a payment channel.
    BALANCE_REFUND = 7
    #: Cancellation: the deposit paid out through a payment channel.
    DEPOSIT_REFUND = 8
    #: A disputed purchase refunded from the operator's payable (corrects it).
    DISPUTE_REFUND = 9
    #: A terminal's reversal of its last transaction (corrects it).
    REVERSAL = 10
    #: Cancellation of a card whose purse went negative: the deposit covers it.
    DEPOSIT_OFFSET = 11


#: Purse postings a chip does not see, so they move ``cards.chip_adjust`` (what
#: the chip holds beyond the ledger purse, migration 0018): a late record's
#: amount following between cards, the desk paying a purse out or making it
#: whole from the deposit, a dispute refund. A replacement's transfer moves it
#: on the old card's side only (the new card's chip is written with the
#: balance): see ``chip_unseen``.
UNSEEN_BY_CHIP = frozenset(
    {
        PostingKind.REPLACED_CARD_FOLLOW,
        PostingKind.BALANCE_REFUND,
        PostingKind.DISPUTE_REFUND,
        PostingKind.DEPOSIT_OFFSET,
    }
)


def chip_unseen(
    kind: PostingKind, card_no: int, debit: int, credit: int, amount: int, purse_base: int
) -> list[tuple[int, int]]:
    """(card, change of its chip adjustment) for one posting (amount > 0).

    Money leaving a purse the chip did not see leaves the chip ahead of the
    ledger (+), money arriving leaves it behind (-).
    """
    if kind in UNSEEN_BY_CHIP:
        sides = [(debit, amount), (credit, -amount)]
    elif kind is PostingKind.REPLACEMENT_TRANSFER:
        own = purse_base + card_no
        sides = [(debit, amount)] if debit == own else [(credit, -amount)] if credit == own else []
    else:
        return []
    limit = purse_base * 2  # purse accounts are purse_base + a 16-digit card number
    return [(a - purse_base, d) for a, d in sides if purse_base <= a < limit]


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
class ProtectedHolder:
    """Holder details as the ledger keeps them: masked for display, keyed digests to check.

    The clear values never get this far (onecard.ledger.pii), so nothing that
    holds one of these can leak a full ID number into a log or the database.
    """

    name_masked: str
    id_masked: str
    phone_masked: str
    name_digest: bytes | None
    id_digest: bytes | None
    phone_digest: bytes | None
    key_id: str


@dataclass(frozen=True, slots=True)
class CardIssue:
    request_id: str
    staff_id: str
    card_no: str
    product: str
    deposit: int
    key_version: int
    channel: PaymentChannel
    holder: ProtectedHolder | None = None


class DeskStatus(enum.IntEnum):
    OK = 1
    CARD_EXISTS = 2
    CONFLICT = 3
    UNKNOWN_CARD = 4
    #: The card's status does not allow the action (detail says which would).
    WRONG_STATE = 5
    #: The holder's ID number does not match the registered card's.
    HOLDER_MISMATCH = 6
    #: A refund larger than the original posting less earlier refunds.
    REFUND_EXCEEDS = 7
    #: The posting is not a purchase of this card.
    NOT_REFUNDABLE = 8
    #: Cancellation accepted; the refund waits out the hold period.
    REFUND_PENDING = 9


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
    holder_name: str = ""
    holder_id_number: str = ""
    holder_phone: str = ""
    lost_at: str = ""
    replaced_by: str = ""
    replaces: str = ""
    deny_listed: bool = False
    #: 0 none, 1 pending, 2 paid (a cancellation's refund)
    refund_state: int = 0
    refund_due_at: str = ""
    refund_paid_at: str = ""
    refund_channel: int = 0
    refund_balance_paid: int = 0
    refund_deposit_paid: int = 0


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
    #: A genuine record under a (terminal, seq) other content holds (CONFLICT).
    IDENTITY_CONFLICT = 5
    #: The same record was refused online; finance settles it.
    REFUSED_ONLINE = 6
    #: The record's key version is not the card's.
    KEY_VERSION_MISMATCH = 7


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


class OfflineRecord(NamedTuple):
    """A purchase the card made while the terminal was offline, already validated.

    A named tuple rather than a frozen dataclass, like OfflineResult: an
    upload makes one per record, and a frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` per field) cost 0.8 us a record against 0.2.
    """

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


class OfflineResult(NamedTuple):
    """Outcome of one offline record, aligned with it in its upload batch."""

    outcome: RecordOutcome
    balance_after: int = 0
    original_outcome: RecordOutcome | None = None
    quarantine_reason: QuarantineReason | None = None
    exceptions: tuple[RecordException, ...] = ()
