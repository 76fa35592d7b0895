from onecard.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenyReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DENY_REASON_UNSPECIFIED: _ClassVar[DenyReason]
    DENY_REASON_LOST: _ClassVar[DenyReason]
    DENY_REASON_BLOCKED: _ClassVar[DenyReason]
    DENY_REASON_CLOSED: _ClassVar[DenyReason]
DENY_REASON_UNSPECIFIED: DenyReason
DENY_REASON_LOST: DenyReason
DENY_REASON_BLOCKED: DenyReason
DENY_REASON_CLOSED: DenyReason

class ReverseRequest(_message.Message):
    __slots__ = ("card_number", "amount", "terminal_id", "terminal_seq", "original_seq", "date_time")
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_ID_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_SEQ_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_SEQ_FIELD_NUMBER: _ClassVar[int]
    DATE_TIME_FIELD_NUMBER: _ClassVar[int]
    card_number: str
    amount: int
    terminal_id: str
    terminal_seq: int
    original_seq: int
    date_time: str
    def __init__(self, card_number: _Optional[str] = ..., amount: _Optional[int] = ..., terminal_id: _Optional[str] = ..., terminal_seq: _Optional[int] = ..., original_seq: _Optional[int] = ..., date_time: _Optional[str] = ...) -> None: ...

class ReverseReply(_message.Message):
    __slots__ = ("status", "balance_after", "original_status", "detail")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    status: _common_pb2.TxnStatus
    balance_after: int
    original_status: _common_pb2.TxnStatus
    detail: str
    def __init__(self, status: _Optional[_Union[_common_pb2.TxnStatus, str]] = ..., balance_after: _Optional[int] = ..., original_status: _Optional[_Union[_common_pb2.TxnStatus, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class GetDenyListRequest(_message.Message):
    __slots__ = ("since_version", "page_size", "page_token")
    SINCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    since_version: int
    page_size: int
    page_token: str
    def __init__(self, since_version: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class DenyListEntry(_message.Message):
    __slots__ = ("card_number", "listed", "reason", "version")
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    LISTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    card_number: str
    listed: bool
    reason: DenyReason
    version: int
    def __init__(self, card_number: _Optional[str] = ..., listed: _Optional[bool] = ..., reason: _Optional[_Union[DenyReason, str]] = ..., version: _Optional[int] = ...) -> None: ...

class GetDenyListReply(_message.Message):
    __slots__ = ("version", "full", "entries", "next_page_token")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    version: int
    full: bool
    entries: _containers.RepeatedCompositeFieldContainer[DenyListEntry]
    next_page_token: str
    def __init__(self, version: _Optional[int] = ..., full: _Optional[bool] = ..., entries: _Optional[_Iterable[_Union[DenyListEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DebitRequest(_message.Message):
    __slots__ = ("card_number", "amount", "transaction_type", "terminal_id", "terminal_seq", "date_time", "key_version", "tac")
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_ID_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_SEQ_FIELD_NUMBER: _ClassVar[int]
    DATE_TIME_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TAC_FIELD_NUMBER: _ClassVar[int]
    card_number: str
    amount: int
    transaction_type: int
    terminal_id: str
    terminal_seq: int
    date_time: str
    key_version: int
    tac: bytes
    def __init__(self, card_number: _Optional[str] = ..., amount: _Optional[int] = ..., transaction_type: _Optional[int] = ..., terminal_id: _Optional[str] = ..., terminal_seq: _Optional[int] = ..., date_time: _Optional[str] = ..., key_version: _Optional[int] = ..., tac: _Optional[bytes] = ...) -> None: ...

class DebitReply(_message.Message):
    __slots__ = ("status", "balance_after", "original_status", "detail")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    status: _common_pb2.TxnStatus
    balance_after: int
    original_status: _common_pb2.TxnStatus
    detail: str
    def __init__(self, status: _Optional[_Union[_common_pb2.TxnStatus, str]] = ..., balance_after: _Optional[int] = ..., original_status: _Optional[_Union[_common_pb2.TxnStatus, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("card_number", "amount", "transaction_type", "terminal_id", "terminal_seq", "date_time", "key_version", "card_random", "online_counter", "old_balance", "mac1", "payment_channel")
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_ID_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_SEQ_FIELD_NUMBER: _ClassVar[int]
    DATE_TIME_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CARD_RANDOM_FIELD_NUMBER: _ClassVar[int]
    ONLINE_COUNTER_FIELD_NUMBER: _ClassVar[int]
    OLD_BALANCE_FIELD_NUMBER: _ClassVar[int]
    MAC1_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    card_number: str
    amount: int
    transaction_type: int
    terminal_id: str
    terminal_seq: int
    date_time: str
    key_version: int
    card_random: bytes
    online_counter: int
    old_balance: int
    mac1: bytes
    payment_channel: _common_pb2.PaymentChannel
    def __init__(self, card_number: _Optional[str] = ..., amount: _Optional[int] = ..., transaction_type: _Optional[int] = ..., terminal_id: _Optional[str] = ..., terminal_seq: _Optional[int] = ..., date_time: _Optional[str] = ..., key_version: _Optional[int] = ..., card_random: _Optional[bytes] = ..., online_counter: _Optional[int] = ..., old_balance: _Optional[int] = ..., mac1: _Optional[bytes] = ..., payment_channel: _Optional[_Union[_common_pb2.PaymentChannel, str]] = ...) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("status", "balance_after", "mac2", "original_status", "detail")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    MAC2_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    status: _common_pb2.TxnStatus
    balance_after: int
    mac2: bytes
    original_status: _common_pb2.TxnStatus
    detail: str
    def __init__(self, status: _Optional[_Union[_common_pb2.TxnStatus, str]] = ..., balance_after: _Optional[int] = ..., mac2: _Optional[bytes] = ..., original_status: _Optional[_Union[_common_pb2.TxnStatus, str]] = ..., detail: _Optional[str] = ...) -> None: ...
