from forgerpc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Transport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_UNSPECIFIED: _ClassVar[Transport]
    TRANSPORT_GRPC: _ClassVar[Transport]
    TRANSPORT_SHARED_MEMORY: _ClassVar[Transport]
TRANSPORT_UNSPECIFIED: Transport
TRANSPORT_GRPC: Transport
TRANSPORT_SHARED_MEMORY: Transport

class PutWeightsHeader(_message.Message):
    __slots__ = ("version", "manifest", "producer", "upload_id", "step")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    version: int
    manifest: _common_pb2.TensorManifest
    producer: str
    upload_id: str
    step: int
    def __init__(self, version: _Optional[int] = ..., manifest: _Optional[_Union[_common_pb2.TensorManifest, _Mapping]] = ..., producer: _Optional[str] = ..., upload_id: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class PutWeightsRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PutWeightsHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PutWeightsHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutWeightsResponse(_message.Message):
    __slots__ = ("version", "bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.WeightVersion
    bytes: int
    def __init__(self, version: _Optional[_Union[_common_pb2.WeightVersion, _Mapping]] = ..., bytes: _Optional[int] = ...) -> None: ...

class GetWeightsRequest(_message.Message):
    __slots__ = ("version", "latest", "tensor_names", "transport", "chunk_bytes", "client_host_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    TENSOR_NAMES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    version: int
    latest: bool
    tensor_names: _containers.RepeatedScalarFieldContainer[str]
    transport: Transport
    chunk_bytes: int
    client_host_id: str
    def __init__(self, version: _Optional[int] = ..., latest: _Optional[bool] = ..., tensor_names: _Optional[_Iterable[str]] = ..., transport: _Optional[_Union[Transport, str]] = ..., chunk_bytes: _Optional[int] = ..., client_host_id: _Optional[str] = ...) -> None: ...

class GetWeightsHeader(_message.Message):
    __slots__ = ("version", "manifest", "segment_name", "lease_id", "transport")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.WeightVersion
    manifest: _common_pb2.TensorManifest
    segment_name: str
    lease_id: str
    transport: Transport
    def __init__(self, version: _Optional[_Union[_common_pb2.WeightVersion, _Mapping]] = ..., manifest: _Optional[_Union[_common_pb2.TensorManifest, _Mapping]] = ..., segment_name: _Optional[str] = ..., lease_id: _Optional[str] = ..., transport: _Optional[_Union[Transport, str]] = ...) -> None: ...

class GetWeightsResponse(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: GetWeightsHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[GetWeightsHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class GetManifestResponse(_message.Message):
    __slots__ = ("version", "manifest")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.WeightVersion
    manifest: _common_pb2.TensorManifest
    def __init__(self, version: _Optional[_Union[_common_pb2.WeightVersion, _Mapping]] = ..., manifest: _Optional[_Union[_common_pb2.TensorManifest, _Mapping]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[_common_pb2.WeightVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[_common_pb2.WeightVersion, _Mapping]]] = ...) -> None: ...

class GetLatestVersionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLatestVersionResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.WeightVersion
    def __init__(self, version: _Optional[_Union[_common_pb2.WeightVersion, _Mapping]] = ...) -> None: ...

class DeleteVersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class DeleteVersionResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class WatchVersionsRequest(_message.Message):
    __slots__ = ("after_version",)
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    after_version: int
    def __init__(self, after_version: _Optional[int] = ...) -> None: ...

class WatchVersionsResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.WeightVersion
    def __init__(self, version: _Optional[_Union[_common_pb2.WeightVersion, _Mapping]] = ...) -> None: ...

class AllocateUploadRequest(_message.Message):
    __slots__ = ("total_bytes",)
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    def __init__(self, total_bytes: _Optional[int] = ...) -> None: ...

class AllocateUploadResponse(_message.Message):
    __slots__ = ("upload_id", "segment_name")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    segment_name: str
    def __init__(self, upload_id: _Optional[str] = ..., segment_name: _Optional[str] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
