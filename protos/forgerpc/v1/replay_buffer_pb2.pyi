from forgerpc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AddEpisodesRequest(_message.Message):
    __slots__ = ("episodes", "max_wait_seconds")
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    episodes: _containers.RepeatedCompositeFieldContainer[_common_pb2.Episode]
    max_wait_seconds: float
    def __init__(self, episodes: _Optional[_Iterable[_Union[_common_pb2.Episode, _Mapping]]] = ..., max_wait_seconds: _Optional[float] = ...) -> None: ...

class AddEpisodesResponse(_message.Message):
    __slots__ = ("stream_ids", "waited_seconds")
    STREAM_IDS_FIELD_NUMBER: _ClassVar[int]
    WAITED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    stream_ids: _containers.RepeatedScalarFieldContainer[str]
    waited_seconds: float
    def __init__(self, stream_ids: _Optional[_Iterable[str]] = ..., waited_seconds: _Optional[float] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("batch_size", "current_policy_version", "whole_groups", "wait_seconds")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    WHOLE_GROUPS_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    current_policy_version: int
    whole_groups: bool
    wait_seconds: float
    def __init__(self, batch_size: _Optional[int] = ..., current_policy_version: _Optional[int] = ..., whole_groups: _Optional[bool] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("batch_id", "episodes")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    episodes: _containers.RepeatedCompositeFieldContainer[_common_pb2.Episode]
    def __init__(self, batch_id: _Optional[str] = ..., episodes: _Optional[_Iterable[_Union[_common_pb2.Episode, _Mapping]]] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("batch_id",)
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    def __init__(self, batch_id: _Optional[str] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("acked",)
    ACKED_FIELD_NUMBER: _ClassVar[int]
    acked: int
    def __init__(self, acked: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("window_size", "stream_length", "pending", "acked_total", "evicted_stale_total", "filtered_groups_total", "backpressure_wait_seconds", "oldest_pending_age_seconds", "age_histogram_counts", "add_rate_per_second")
    WINDOW_SIZE_FIELD_NUMBER: _ClassVar[int]
    STREAM_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    ACKED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EVICTED_STALE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FILTERED_GROUPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BACKPRESSURE_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_PENDING_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGE_HISTOGRAM_COUNTS_FIELD_NUMBER: _ClassVar[int]
    ADD_RATE_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    window_size: int
    stream_length: int
    pending: int
    acked_total: int
    evicted_stale_total: int
    filtered_groups_total: int
    backpressure_wait_seconds: float
    oldest_pending_age_seconds: float
    age_histogram_counts: _containers.RepeatedScalarFieldContainer[int]
    add_rate_per_second: float
    def __init__(self, window_size: _Optional[int] = ..., stream_length: _Optional[int] = ..., pending: _Optional[int] = ..., acked_total: _Optional[int] = ..., evicted_stale_total: _Optional[int] = ..., filtered_groups_total: _Optional[int] = ..., backpressure_wait_seconds: _Optional[float] = ..., oldest_pending_age_seconds: _Optional[float] = ..., age_histogram_counts: _Optional[_Iterable[int]] = ..., add_rate_per_second: _Optional[float] = ...) -> None: ...
