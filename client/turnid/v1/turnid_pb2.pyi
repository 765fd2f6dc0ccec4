import datetime

from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TurnKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TURN_KIND_UNSPECIFIED: _ClassVar[TurnKind]
    TURN_KIND_REALTIME_DELEGATION: _ClassVar[TurnKind]
    TURN_KIND_AUTO_COMPACTION: _ClassVar[TurnKind]
    TURN_KIND_USER_INPUT: _ClassVar[TurnKind]
TURN_KIND_UNSPECIFIED: TurnKind
TURN_KIND_REALTIME_DELEGATION: TurnKind
TURN_KIND_AUTO_COMPACTION: TurnKind
TURN_KIND_USER_INPUT: TurnKind

class Turn(_message.Message):
    __slots__ = ("thread_id", "turn_id", "kind", "sequence", "create_time", "request_id", "claimed")
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_FIELD_NUMBER: _ClassVar[int]
    thread_id: str
    turn_id: str
    kind: TurnKind
    sequence: int
    create_time: _timestamp_pb2.Timestamp
    request_id: str
    claimed: bool
    def __init__(self, thread_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., kind: _Optional[_Union[TurnKind, str]] = ..., sequence: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., claimed: _Optional[bool] = ...) -> None: ...

class AllocateTurnIdRequest(_message.Message):
    __slots__ = ("thread_id", "kind", "request_id", "expected_last_sequence")
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    thread_id: str
    kind: TurnKind
    request_id: str
    expected_last_sequence: int
    def __init__(self, thread_id: _Optional[str] = ..., kind: _Optional[_Union[TurnKind, str]] = ..., request_id: _Optional[str] = ..., expected_last_sequence: _Optional[int] = ...) -> None: ...

class AllocateTurnIdResponse(_message.Message):
    __slots__ = ("turn",)
    TURN_FIELD_NUMBER: _ClassVar[int]
    turn: Turn
    def __init__(self, turn: _Optional[_Union[Turn, _Mapping]] = ...) -> None: ...

class BatchAllocateTurnIdsRequest(_message.Message):
    __slots__ = ("thread_id", "kind", "count", "request_id", "expected_last_sequence")
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    thread_id: str
    kind: TurnKind
    count: int
    request_id: str
    expected_last_sequence: int
    def __init__(self, thread_id: _Optional[str] = ..., kind: _Optional[_Union[TurnKind, str]] = ..., count: _Optional[int] = ..., request_id: _Optional[str] = ..., expected_last_sequence: _Optional[int] = ...) -> None: ...

class BatchAllocateTurnIdsResponse(_message.Message):
    __slots__ = ("turns",)
    TURNS_FIELD_NUMBER: _ClassVar[int]
    turns: _containers.RepeatedCompositeFieldContainer[Turn]
    def __init__(self, turns: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ...) -> None: ...

class ClaimTurnIdRequest(_message.Message):
    __slots__ = ("thread_id", "turn_id", "kind", "request_id", "expected_last_sequence")
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    thread_id: str
    turn_id: str
    kind: TurnKind
    request_id: str
    expected_last_sequence: int
    def __init__(self, thread_id: _Optional[str] = ..., turn_id: _Optional[str] = ..., kind: _Optional[_Union[TurnKind, str]] = ..., request_id: _Optional[str] = ..., expected_last_sequence: _Optional[int] = ...) -> None: ...

class ClaimTurnIdResponse(_message.Message):
    __slots__ = ("turn",)
    TURN_FIELD_NUMBER: _ClassVar[int]
    turn: Turn
    def __init__(self, turn: _Optional[_Union[Turn, _Mapping]] = ...) -> None: ...

class GetTurnRequest(_message.Message):
    __slots__ = ("thread_id", "turn_id")
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    thread_id: str
    turn_id: str
    def __init__(self, thread_id: _Optional[str] = ..., turn_id: _Optional[str] = ...) -> None: ...

class GetTurnResponse(_message.Message):
    __slots__ = ("turn",)
    TURN_FIELD_NUMBER: _ClassVar[int]
    turn: Turn
    def __init__(self, turn: _Optional[_Union[Turn, _Mapping]] = ...) -> None: ...

class ListTurnsRequest(_message.Message):
    __slots__ = ("thread_id", "page_size", "page_token")
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    thread_id: str
    page_size: int
    page_token: str
    def __init__(self, thread_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTurnsResponse(_message.Message):
    __slots__ = ("turns", "next_page_token")
    TURNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    turns: _containers.RepeatedCompositeFieldContainer[Turn]
    next_page_token: str
    def __init__(self, turns: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Thread(_message.Message):
    __slots__ = ("thread_id", "last_sequence", "next_compaction_index", "last_turn", "create_time", "update_time")
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    NEXT_COMPACTION_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_TURN_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    thread_id: str
    last_sequence: int
    next_compaction_index: int
    last_turn: Turn
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, thread_id: _Optional[str] = ..., last_sequence: _Optional[int] = ..., next_compaction_index: _Optional[int] = ..., last_turn: _Optional[_Union[Turn, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetThreadRequest(_message.Message):
    __slots__ = ("thread_id",)
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    thread_id: str
    def __init__(self, thread_id: _Optional[str] = ...) -> None: ...

class GetThreadResponse(_message.Message):
    __slots__ = ("thread",)
    THREAD_FIELD_NUMBER: _ClassVar[int]
    thread: Thread
    def __init__(self, thread: _Optional[_Union[Thread, _Mapping]] = ...) -> None: ...

class WatchTurnsRequest(_message.Message):
    __slots__ = ("thread_id", "after_sequence")
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    thread_id: str
    after_sequence: int
    def __init__(self, thread_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class WatchTurnsResponse(_message.Message):
    __slots__ = ("turns", "caught_up")
    TURNS_FIELD_NUMBER: _ClassVar[int]
    CAUGHT_UP_FIELD_NUMBER: _ClassVar[int]
    turns: _containers.RepeatedCompositeFieldContainer[Turn]
    caught_up: bool
    def __init__(self, turns: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., caught_up: _Optional[bool] = ...) -> None: ...

class AllocateManyRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[AllocateManyItem]
    def __init__(self, items: _Optional[_Iterable[_Union[AllocateManyItem, _Mapping]]] = ...) -> None: ...

class AllocateManyItem(_message.Message):
    __slots__ = ("allocate", "batch_allocate", "claim")
    ALLOCATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_ALLOCATE_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    allocate: AllocateTurnIdRequest
    batch_allocate: BatchAllocateTurnIdsRequest
    claim: ClaimTurnIdRequest
    def __init__(self, allocate: _Optional[_Union[AllocateTurnIdRequest, _Mapping]] = ..., batch_allocate: _Optional[_Union[BatchAllocateTurnIdsRequest, _Mapping]] = ..., claim: _Optional[_Union[ClaimTurnIdRequest, _Mapping]] = ...) -> None: ...

class AllocateManyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[AllocateManyResult]
    def __init__(self, results: _Optional[_Iterable[_Union[AllocateManyResult, _Mapping]]] = ...) -> None: ...

class AllocateManyResult(_message.Message):
    __slots__ = ("turns", "status")
    TURNS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    turns: _containers.RepeatedCompositeFieldContainer[Turn]
    status: Status
    def __init__(self, turns: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., status: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    details: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., details: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ...) -> None: ...
