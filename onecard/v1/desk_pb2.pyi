from onecard.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeskStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DESK_STATUS_UNSPECIFIED: _ClassVar[DeskStatus]
    DESK_STATUS_OK: _ClassVar[DeskStatus]
    DESK_STATUS_CARD_EXISTS: _ClassVar[DeskStatus]
    DESK_STATUS_CONFLICT: _ClassVar[DeskStatus]
DESK_STATUS_UNSPECIFIED: DeskStatus
DESK_STATUS_OK: DeskStatus
DESK_STATUS_CARD_EXISTS: DeskStatus
DESK_STATUS_CONFLICT: DeskStatus

class IssueCardRequest(_message.Message):
    __slots__ = ("request_id", "card_number", "product", "deposit", "key_version", "payment_channel")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    DEPOSIT_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    card_number: str
    product: str
    deposit: int
    key_version: int
    payment_channel: _common_pb2.PaymentChannel
    def __init__(self, request_id: _Optional[str] = ..., card_number: _Optional[str] = ..., product: _Optional[str] = ..., deposit: _Optional[int] = ..., key_version: _Optional[int] = ..., payment_channel: _Optional[_Union[_common_pb2.PaymentChannel, str]] = ...) -> None: ...

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
    __slots__ = ("card_number", "issuer", "key_version", "product", "status", "balance", "deposit", "online_counter", "offline_counter", "issued_at", "last_used_at")
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
    def __init__(self, card_number: _Optional[str] = ..., issuer: _Optional[str] = ..., key_version: _Optional[int] = ..., product: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.CardStatus, str]] = ..., balance: _Optional[int] = ..., deposit: _Optional[int] = ..., online_counter: _Optional[int] = ..., offline_counter: _Optional[int] = ..., issued_at: _Optional[str] = ..., last_used_at: _Optional[str] = ...) -> None: ...
