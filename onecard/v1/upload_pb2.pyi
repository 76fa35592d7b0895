from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecordOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECORD_OUTCOME_UNSPECIFIED: _ClassVar[RecordOutcome]
    RECORD_OUTCOME_POSTED: _ClassVar[RecordOutcome]
    RECORD_OUTCOME_DUPLICATE: _ClassVar[RecordOutcome]
    RECORD_OUTCOME_QUARANTINED: _ClassVar[RecordOutcome]
    RECORD_OUTCOME_POSTED_WITH_EXCEPTION: _ClassVar[RecordOutcome]
    RECORD_OUTCOME_CONFLICT: _ClassVar[RecordOutcome]

class QuarantineReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUARANTINE_REASON_UNSPECIFIED: _ClassVar[QuarantineReason]
    QUARANTINE_REASON_TAC_INVALID: _ClassVar[QuarantineReason]
    QUARANTINE_REASON_KEY_VERSION_UNKNOWN: _ClassVar[QuarantineReason]
    QUARANTINE_REASON_UNKNOWN_CARD: _ClassVar[QuarantineReason]
    QUARANTINE_REASON_UNKNOWN_TERMINAL: _ClassVar[QuarantineReason]
    QUARANTINE_REASON_IDENTITY_CONFLICT: _ClassVar[QuarantineReason]
    QUARANTINE_REASON_REFUSED_ONLINE: _ClassVar[QuarantineReason]
    QUARANTINE_REASON_KEY_VERSION_MISMATCH: _ClassVar[QuarantineReason]

class RecordException(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECORD_EXCEPTION_UNSPECIFIED: _ClassVar[RecordException]
    RECORD_EXCEPTION_CARD_LOST: _ClassVar[RecordException]
    RECORD_EXCEPTION_CARD_BLOCKED: _ClassVar[RecordException]
    RECORD_EXCEPTION_NEGATIVE_BALANCE: _ClassVar[RecordException]
    RECORD_EXCEPTION_BALANCE_MISMATCH: _ClassVar[RecordException]
    RECORD_EXCEPTION_COUNTER_GAP: _ClassVar[RecordException]
    RECORD_EXCEPTION_COUNTER_REPEAT: _ClassVar[RecordException]
RECORD_OUTCOME_UNSPECIFIED: RecordOutcome
RECORD_OUTCOME_POSTED: RecordOutcome
RECORD_OUTCOME_DUPLICATE: RecordOutcome
RECORD_OUTCOME_QUARANTINED: RecordOutcome
RECORD_OUTCOME_POSTED_WITH_EXCEPTION: RecordOutcome
RECORD_OUTCOME_CONFLICT: RecordOutcome
QUARANTINE_REASON_UNSPECIFIED: QuarantineReason
QUARANTINE_REASON_TAC_INVALID: QuarantineReason
QUARANTINE_REASON_KEY_VERSION_UNKNOWN: QuarantineReason
QUARANTINE_REASON_UNKNOWN_CARD: QuarantineReason
QUARANTINE_REASON_UNKNOWN_TERMINAL: QuarantineReason
QUARANTINE_REASON_IDENTITY_CONFLICT: QuarantineReason
QUARANTINE_REASON_REFUSED_ONLINE: QuarantineReason
QUARANTINE_REASON_KEY_VERSION_MISMATCH: QuarantineReason
RECORD_EXCEPTION_UNSPECIFIED: RecordException
RECORD_EXCEPTION_CARD_LOST: RecordException
RECORD_EXCEPTION_CARD_BLOCKED: RecordException
RECORD_EXCEPTION_NEGATIVE_BALANCE: RecordException
RECORD_EXCEPTION_BALANCE_MISMATCH: RecordException
RECORD_EXCEPTION_COUNTER_GAP: RecordException
RECORD_EXCEPTION_COUNTER_REPEAT: RecordException

class OfflineRecord(_message.Message):
    __slots__ = ("card_number", "amount", "transaction_type", "terminal_id", "terminal_seq", "date_time", "key_version", "tac", "offline_counter", "card_balance_before")
    CARD_NUMBER_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_ID_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_SEQ_FIELD_NUMBER: _ClassVar[int]
    DATE_TIME_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TAC_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_COUNTER_FIELD_NUMBER: _ClassVar[int]
    CARD_BALANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    card_number: str
    amount: int
    transaction_type: int
    terminal_id: str
    terminal_seq: int
    date_time: str
    key_version: int
    tac: bytes
    offline_counter: int
    card_balance_before: int
    def __init__(self, card_number: _Optional[str] = ..., amount: _Optional[int] = ..., transaction_type: _Optional[int] = ..., terminal_id: _Optional[str] = ..., terminal_seq: _Optional[int] = ..., date_time: _Optional[str] = ..., key_version: _Optional[int] = ..., tac: _Optional[bytes] = ..., offline_counter: _Optional[int] = ..., card_balance_before: _Optional[int] = ...) -> None: ...

class UploadBatch(_message.Message):
    __slots__ = ("batch_id", "records", "claimed_count", "claimed_total")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_COUNT_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    records: _containers.RepeatedCompositeFieldContainer[OfflineRecord]
    claimed_count: int
    claimed_total: int
    def __init__(self, batch_id: _Optional[str] = ..., records: _Optional[_Iterable[_Union[OfflineRecord, _Mapping]]] = ..., claimed_count: _Optional[int] = ..., claimed_total: _Optional[int] = ...) -> None: ...

class RecordResult(_message.Message):
    __slots__ = ("outcome", "balance_after", "original_outcome", "quarantine_reason", "exceptions")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    BALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_REASON_FIELD_NUMBER: _ClassVar[int]
    EXCEPTIONS_FIELD_NUMBER: _ClassVar[int]
    outcome: RecordOutcome
    balance_after: int
    original_outcome: RecordOutcome
    quarantine_reason: QuarantineReason
    exceptions: _containers.RepeatedScalarFieldContainer[RecordException]
    def __init__(self, outcome: _Optional[_Union[RecordOutcome, str]] = ..., balance_after: _Optional[int] = ..., original_outcome: _Optional[_Union[RecordOutcome, str]] = ..., quarantine_reason: _Optional[_Union[QuarantineReason, str]] = ..., exceptions: _Optional[_Iterable[_Union[RecordException, str]]] = ...) -> None: ...

class UploadBatchReply(_message.Message):
    __slots__ = ("batch_id", "results", "posted", "duplicates", "quarantined", "exceptions")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    POSTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    EXCEPTIONS_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    results: _containers.RepeatedCompositeFieldContainer[RecordResult]
    posted: int
    duplicates: int
    quarantined: int
    exceptions: int
    def __init__(self, batch_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[RecordResult, _Mapping]]] = ..., posted: _Optional[int] = ..., duplicates: _Optional[int] = ..., quarantined: _Optional[int] = ..., exceptions: _Optional[int] = ...) -> None: ...
