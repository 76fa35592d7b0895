from onecard.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeskStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DESK_STATUS_UNSPECIFIED: _ClassVar[DeskStatus]
    DESK_STATUS_OK: _ClassVar[DeskStatus]
    DESK_STATUS_CARD_EXISTS: _ClassVar[DeskStatus]
    DESK_STATUS_CONFLICT: _ClassVar[DeskStatus]
    DESK_STATUS_UNKNOWN_CARD: _ClassVar[DeskStatus]
    DESK_STATUS_WRONG_STATE: _ClassVar[DeskStatus]
    DESK_STATUS_HOLDER_MISMATCH: _ClassVar[DeskStatus]
    DESK_STATUS_REFUND_EXCEEDS: _ClassVar[DeskStatus]
    DESK_STATUS_NOT_REFUNDABLE: _ClassVar[DeskStatus]
    DESK_STATUS_REFUND_PENDING: _ClassVar[DeskStatus]

class RefundState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFUND_STATE_UNSPECIFIED: _ClassVar[RefundState]
    REFUND_STATE_PENDING: _ClassVar[RefundState]
    REFUND_STATE_PAID: _ClassVar[RefundState]

class ReplaceReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLACE_REASON_UNSPECIFIED: _ClassVar[ReplaceReason]
    REPLACE_REASON_LOST: _ClassVar[ReplaceReason]
    REPLACE_REASON_DAMAGED: _ClassVar[ReplaceReason]

class PostingKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POSTING_KIND_UNSPECIFIED: _ClassVar[PostingKind]
    POSTING_KIND_PURCHASE: _ClassVar[PostingKind]
    POSTING_KIND_LOAD: _ClassVar[PostingKind]
    POSTING_KIND_DEPOSIT: _ClassVar[PostingKind]
    POSTING_KIND_REPLACED_CARD_FOLLOW: _ClassVar[PostingKind]
    POSTING_KIND_REPLACEMENT_TRANSFER: _ClassVar[PostingKind]
    POSTING_KIND_DEPOSIT_TRANSFER: _ClassVar[PostingKind]
    POSTING_KIND_BALANCE_REFUND: _ClassVar[PostingKind]
    POSTING_KIND_DEPOSIT_REFUND: _ClassVar[PostingKind]
    POSTING_KIND_DISPUTE_REFUND: _ClassVar[PostingKind]
    POSTING_KIND_REVERSAL: _ClassVar[PostingKind]
    POSTING_KIND_DEPOSIT_OFFSET: _ClassVar[PostingKind]
DESK_STATUS_UNSPECIFIED: DeskStatus
DESK_STATUS_OK: DeskStatus
DESK_STATUS_CARD_EXISTS: DeskStatus
DESK_STATUS_CONFLICT: DeskStatus
DESK_STATUS_UNKNOWN_CARD: DeskStatus
DESK_STATUS_WRONG_STATE: DeskStatus
DESK_STATUS_HOLDER_MISMATCH: DeskStatus
DESK_STATUS_REFUND_EXCEEDS: DeskStatus
DESK_STATUS_NOT_REFUNDABLE: DeskStatus
DESK_STATUS_REFUND_PENDING: DeskStatus
REFUND_STATE_UNSPECIFIED: RefundState
REFUND_STATE_PENDING: RefundState
REFUND_STATE_PAID: RefundState
REPLACE_REASON_UNSPECIFIED: ReplaceReason
REPLACE_REASON_LOST: ReplaceReason
REPLACE_REASON_DAMAGED: ReplaceReason
POSTING_KIND_UNSPECIFIED: PostingKind
POSTING_KIND_PURCHASE: PostingKind
POSTING_KIND_LOAD: PostingKind
POSTING_KIND_DEPOSIT: PostingKind
POSTING_KIND_REPLACED_CARD_FOLLOW: PostingKind
POSTING_KIND_REPLACEMENT_TRANSFER: PostingKind
POSTING_KIND_DEPOSIT_TRANSFER: PostingKind
POSTING_KIND_BALANCE_REFUND: PostingKind
POSTING_KIND_DEPOSIT_REFUND: PostingKind
POSTING_KIND_DISPUTE_REFUND: PostingKind
POSTING_KIND_REVERSAL: PostingKind
POSTING_KIND_DEPOSIT_OFFSET: PostingKind

class Holder(_message.Message):
    __slots__ = ("name", "id_number", "phone")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PHONE_FIELD_NUMBER: _ClassVar[int]
    name: str
    id_number: str
    phone: str
    def __init__(self, name: _Optional[str] = ..., id_number: _Optional[str] = ..., phone: _Optional[str] = ...) -> None: ...

class IssueCardRequest(_message.Message):
    __slots__ = ("request_id", "card_number", "product", "deposit", "key_version", "payment_channel", "holder")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    DEPOSIT_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    card_number: str
    product: str
    deposit: int
    key_version: int
    payment_channel: _common_pb2.PaymentChannel
    holder: Holder
    def __init__(self, request_id: _Optional[str] = ..., card_number: _Optional[str] = ..., product: _Optional[str] = ..., deposit: _Optional[int] = ..., key_version: _Optional[int] = ..., payment_channel: _Optional[_Union[_common_pb2.PaymentChannel, str]] = ..., holder: _Optional[_Union[Holder, _Mapping]] = ...) -> None: ...

class IssueCardReply(_message.Message):
    __slots__ = ("status", "card", "detail")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CARD_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    status: DeskStatus
    card: Card
    detail: str
    def __init__(self, status: _Optional[_Union[DeskStatus, str]] = ..., card: _Optional[_Union[Card, _Mapping]] = ..., detail: _Optional[str] = ...) -> None: ...

class GetCardRequest(_message.Message):
    __slots__ = ("card_number",)
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    card_number: str
    def __init__(self, card_number: _Optional[str] = ...) -> None: ...

class Card(_message.Message):
    __slots__ = ("card_number", "issuer", "key_version", "product", "status", "balance", "deposit", "online_counter", "offline_counter", "issued_at", "last_used_at", "holder", "lost_at", "replaced_by", "replaces", "deny_listed", "refund")
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    DEPOSIT_FIELD_NUMBER: _ClassVar[int]
    ONLINE_COUNTER_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_COUNTER_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    LOST_AT_FIELD_NUMBER: _ClassVar[int]
    REPLACED_BY_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    DENY_LISTED_FIELD_NUMBER: _ClassVar[int]
    REFUND_FIELD_NUMBER: _ClassVar[int]
    card_number: str
    issuer: str
    key_version: int
    product: str
    status: _common_pb2.CardStatus
    balance: int
    deposit: int
    online_counter: int
    offline_counter: int
    issued_at: str
    last_used_at: str
    holder: Holder
    lost_at: str
    replaced_by: str
    replaces: str
    deny_listed: bool
    refund: HeldRefund
    def __init__(self, card_number: _Optional[str] = ..., issuer: _Optional[str] = ..., key_version: _Optional[int] = ..., product: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.CardStatus, str]] = ..., balance: _Optional[int] = ..., deposit: _Optional[int] = ..., online_counter: _Optional[int] = ..., offline_counter: _Optional[int] = ..., issued_at: _Optional[str] = ..., last_used_at: _Optional[str] = ..., holder: _Optional[_Union[Holder, _Mapping]] = ..., lost_at: _Optional[str] = ..., replaced_by: _Optional[str] = ..., replaces: _Optional[str] = ..., deny_listed: _Optional[bool] = ..., refund: _Optional[_Union[HeldRefund, _Mapping]] = ...) -> None: ...

class HeldRefund(_message.Message):
    __slots__ = ("state", "due_at", "paid_at", "channel", "balance_paid", "deposit_paid")
    STATE_FIELD_NUMBER: _ClassVar[int]
    DUE_AT_FIELD_NUMBER: _ClassVar[int]
    PAID_AT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    BALANCE_PAID_FIELD_NUMBER: _ClassVar[int]
    DEPOSIT_PAID_FIELD_NUMBER: _ClassVar[int]
    state: RefundState
    due_at: str
    paid_at: str
    channel: _common_pb2.PaymentChannel
    balance_paid: int
    deposit_paid: int
    def __init__(self, state: _Optional[_Union[RefundState, str]] = ..., due_at: _Optional[str] = ..., paid_at: _Optional[str] = ..., channel: _Optional[_Union[_common_pb2.PaymentChannel, str]] = ..., balance_paid: _Optional[int] = ..., deposit_paid: _Optional[int] = ...) -> None: ...

class DeskReply(_message.Message):
    __slots__ = ("status", "card", "detail", "new_card", "amount", "posting_id")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CARD_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    NEW_CARD_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    POSTING_ID_FIELD_NUMBER: _ClassVar[int]
    status: DeskStatus
    card: Card
    detail: str
    new_card: Card
    amount: int
    posting_id: int
    def __init__(self, status: _Optional[_Union[DeskStatus, str]] = ..., card: _Optional[_Union[Card, _Mapping]] = ..., detail: _Optional[str] = ..., new_card: _Optional[_Union[Card, _Mapping]] = ..., amount: _Optional[int] = ..., posting_id: _Optional[int] = ...) -> None: ...

class CardActionRequest(_message.Message):
    __slots__ = ("request_id", "card_number", "holder_id_number")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    HOLDER_ID_NUMBER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    card_number: str
    holder_id_number: str
    def __init__(self, request_id: _Optional[str] = ..., card_number: _Optional[str] = ..., holder_id_number: _Optional[str] = ...) -> None: ...

class ReplaceCardRequest(_message.Message):
    __slots__ = ("request_id", "card_number", "new_card_number", "key_version", "reason", "holder_id_number")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    NEW_CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HOLDER_ID_NUMBER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    card_number: str
    new_card_number: str
    key_version: int
    reason: ReplaceReason
    holder_id_number: str
    def __init__(self, request_id: _Optional[str] = ..., card_number: _Optional[str] = ..., new_card_number: _Optional[str] = ..., key_version: _Optional[int] = ..., reason: _Optional[_Union[ReplaceReason, str]] = ..., holder_id_number: _Optional[str] = ...) -> None: ...

class CancelCardRequest(_message.Message):
    __slots__ = ("request_id", "card_number", "refund_channel", "card_readable", "card_balance", "holder_id_number")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    REFUND_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CARD_READABLE_FIELD_NUMBER: _ClassVar[int]
    CARD_BALANCE_FIELD_NUMBER: _ClassVar[int]
    HOLDER_ID_NUMBER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    card_number: str
    refund_channel: _common_pb2.PaymentChannel
    card_readable: bool
    card_balance: int
    holder_id_number: str
    def __init__(self, request_id: _Optional[str] = ..., card_number: _Optional[str] = ..., refund_channel: _Optional[_Union[_common_pb2.PaymentChannel, str]] = ..., card_readable: _Optional[bool] = ..., card_balance: _Optional[int] = ..., holder_id_number: _Optional[str] = ...) -> None: ...

class RefundPostingRequest(_message.Message):
    __slots__ = ("request_id", "card_number", "posting_id", "amount", "case_reference", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    POSTING_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CASE_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    card_number: str
    posting_id: int
    amount: int
    case_reference: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., card_number: _Optional[str] = ..., posting_id: _Optional[int] = ..., amount: _Optional[int] = ..., case_reference: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetHistoryRequest(_message.Message):
    __slots__ = ("card_number", "from_time", "to_time", "page_size", "page_token")
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    FROM_TIME_FIELD_NUMBER: _ClassVar[int]
    TO_TIME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    card_number: str
    from_time: str
    to_time: str
    page_size: int
    page_token: str
    def __init__(self, card_number: _Optional[str] = ..., from_time: _Optional[str] = ..., to_time: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class HistoryEntry(_message.Message):
    __slots__ = ("posting_id", "posted_at", "kind", "account", "amount", "counterparty", "terminal_id", "terminal_seq", "corrects")
    POSTING_ID_FIELD_NUMBER: _ClassVar[int]
    POSTED_AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    COUNTERPARTY_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_ID_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_SEQ_FIELD_NUMBER: _ClassVar[int]
    CORRECTS_FIELD_NUMBER: _ClassVar[int]
    posting_id: int
    posted_at: str
    kind: PostingKind
    account: str
    amount: int
    counterparty: str
    terminal_id: str
    terminal_seq: int
    corrects: int
    def __init__(self, posting_id: _Optional[int] = ..., posted_at: _Optional[str] = ..., kind: _Optional[_Union[PostingKind, str]] = ..., account: _Optional[str] = ..., amount: _Optional[int] = ..., counterparty: _Optional[str] = ..., terminal_id: _Optional[str] = ..., terminal_seq: _Optional[int] = ..., corrects: _Optional[int] = ...) -> None: ...

class GetHistoryReply(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[HistoryEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[HistoryEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
