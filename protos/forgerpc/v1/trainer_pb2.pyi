from forgerpc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Objective(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OBJECTIVE_UNSPECIFIED: _ClassVar[Objective]
    OBJECTIVE_POLICY_GRADIENT: _ClassVar[Objective]
    OBJECTIVE_SFT: _ClassVar[Objective]
OBJECTIVE_UNSPECIFIED: Objective
OBJECTIVE_POLICY_GRADIENT: Objective
OBJECTIVE_SFT: Objective

class TrainStepRequest(_message.Message):
    __slots__ = ("episodes", "objective", "learning_rate", "from_buffer", "reset_optimizer")
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    FROM_BUFFER_FIELD_NUMBER: _ClassVar[int]
    RESET_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    episodes: _containers.RepeatedCompositeFieldContainer[_common_pb2.Episode]
    objective: Objective
    learning_rate: float
    from_buffer: BufferSample
    reset_optimizer: bool
    def __init__(self, episodes: _Optional[_Iterable[_Union[_common_pb2.Episode, _Mapping]]] = ..., objective: _Optional[_Union[Objective, str]] = ..., learning_rate: _Optional[float] = ..., from_buffer: _Optional[_Union[BufferSample, _Mapping]] = ..., reset_optimizer: _Optional[bool] = ...) -> None: ...

class BufferSample(_message.Message):
    __slots__ = ("batch_size", "whole_groups", "wait_seconds")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    WHOLE_GROUPS_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    whole_groups: bool
    wait_seconds: float
    def __init__(self, batch_size: _Optional[int] = ..., whole_groups: _Optional[bool] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class TrainStepResponse(_message.Message):
    __slots__ = ("step", "loss", "grad_norm", "learning_rate", "tokens", "kl", "clip_fraction", "entropy", "step_seconds", "skipped", "skip_reason", "batch_id", "episodes", "groups")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    CLIP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SKIP_REASON_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    grad_norm: float
    learning_rate: float
    tokens: int
    kl: float
    clip_fraction: float
    entropy: float
    step_seconds: float
    skipped: bool
    skip_reason: str
    batch_id: str
    episodes: int
    groups: int
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., grad_norm: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens: _Optional[int] = ..., kl: _Optional[float] = ..., clip_fraction: _Optional[float] = ..., entropy: _Optional[float] = ..., step_seconds: _Optional[float] = ..., skipped: _Optional[bool] = ..., skip_reason: _Optional[str] = ..., batch_id: _Optional[str] = ..., episodes: _Optional[int] = ..., groups: _Optional[int] = ...) -> None: ...

class PublishWeightsRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class PublishWeightsResponse(_message.Message):
    __slots__ = ("version", "bytes", "seconds", "location")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.WeightVersion
    bytes: int
    seconds: float
    location: str
    def __init__(self, version: _Optional[_Union[_common_pb2.WeightVersion, _Mapping]] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., location: _Optional[str] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("directory", "data_position")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    DATA_POSITION_FIELD_NUMBER: _ClassVar[int]
    directory: str
    data_position: str
    def __init__(self, directory: _Optional[str] = ..., data_position: _Optional[str] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("path", "step")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    path: str
    step: int
    def __init__(self, path: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class LoadCheckpointRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class LoadCheckpointResponse(_message.Message):
    __slots__ = ("step", "policy_version", "data_position")
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_POSITION_FIELD_NUMBER: _ClassVar[int]
    step: int
    policy_version: int
    data_position: str
    def __init__(self, step: _Optional[int] = ..., policy_version: _Optional[int] = ..., data_position: _Optional[str] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStateResponse(_message.Message):
    __slots__ = ("step", "policy_version", "backend", "config_yaml")
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    step: int
    policy_version: int
    backend: str
    config_yaml: str
    def __init__(self, step: _Optional[int] = ..., policy_version: _Optional[int] = ..., backend: _Optional[str] = ..., config_yaml: _Optional[str] = ...) -> None: ...
