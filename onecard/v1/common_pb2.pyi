from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class TxnStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TXN_STATUS_UNSPECIFIED: _ClassVar[TxnStatus]
    TXN_STATUS_APPROVED: _ClassVar[TxnStatus]
    TXN_STATUS_INSUFFICIENT_FUNDS: _ClassVar[TxnStatus]
    TXN_STATUS_UNKNOWN_CARD: _ClassVar[TxnStatus]
    TXN_STATUS_CARD_NOT_ACTIVE: _ClassVar[TxnStatus]
    TXN_STATUS_MAC_INVALID: _ClassVar[TxnStatus]
    TXN_STATUS_OVER_LIMIT: _ClassVar[TxnStatus]
    TXN_STATUS_DUPLICATE: _ClassVar[TxnStatus]
    TXN_STATUS_CONFLICT: _ClassVar[TxnStatus]
    TXN_STATUS_UNKNOWN_TERMINAL: _ClassVar[TxnStatus]
    TXN_STATUS_NOT_REVERSIBLE: _ClassVar[TxnStatus]
    TXN_STATUS_ALREADY_REVERSED: _ClassVar[TxnStatus]
    TXN_STATUS_STALE_COUNTER: _ClassVar[TxnStatus]

class PaymentChannel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYMENT_CHANNEL_UNSPECIFIED: _ClassVar[PaymentChannel]
    PAYMENT_CHANNEL_CASH: _ClassVar[PaymentChannel]
    PAYMENT_CHANNEL_BANK_CARD: _ClassVar[PaymentChannel]
    PAYMENT_CHANNEL_ALIPAY: _ClassVar[PaymentChannel]
    PAYMENT_CHANNEL_WECHAT_PAY: _ClassVar[PaymentChannel]

class CardStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CARD_STATUS_UNSPECIFIED: _ClassVar[CardStatus]
    CARD_STATUS_ACTIVE: _ClassVar[CardStatus]
    CARD_STATUS_LOST: _ClassVar[CardStatus]
    CARD_STATUS_BLOCKED: _ClassVar[CardStatus]
    CARD_STATUS_CLOSED: _ClassVar[CardStatus]
TXN_STATUS_UNSPECIFIED: TxnStatus
TXN_STATUS_APPROVED: TxnStatus
TXN_STATUS_INSUFFICIENT_FUNDS: TxnStatus
TXN_STATUS_UNKNOWN_CARD: TxnStatus
TXN_STATUS_CARD_NOT_ACTIVE: TxnStatus
TXN_STATUS_MAC_INVALID: TxnStatus
TXN_STATUS_OVER_LIMIT: TxnStatus
TXN_STATUS_DUPLICATE: TxnStatus
TXN_STATUS_CONFLICT: TxnStatus
TXN_STATUS_UNKNOWN_TERMINAL: TxnStatus
TXN_STATUS_NOT_REVERSIBLE: TxnStatus
TXN_STATUS_ALREADY_REVERSED: TxnStatus
TXN_STATUS_STALE_COUNTER: TxnStatus
PAYMENT_CHANNEL_UNSPECIFIED: PaymentChannel
PAYMENT_CHANNEL_CASH: PaymentChannel
PAYMENT_CHANNEL_BANK_CARD: PaymentChannel
PAYMENT_CHANNEL_ALIPAY: PaymentChannel
PAYMENT_CHANNEL_WECHAT_PAY: PaymentChannel
CARD_STATUS_UNSPECIFIED: CardStatus
CARD_STATUS_ACTIVE: CardStatus
CARD_STATUS_LOST: CardStatus
CARD_STATUS_BLOCKED: CardStatus
CARD_STATUS_CLOSED: CardStatus
