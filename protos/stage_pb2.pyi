from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    CODEC_NONE: _ClassVar[Codec]
    CODEC_FP16: _ClassVar[Codec]
    CODEC_BF16: _ClassVar[Codec]
    CODEC_INT8: _ClassVar[Codec]

class Int8Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INT8_LAYOUT_UNSPECIFIED: _ClassVar[Int8Layout]
    INT8_LAYOUT_RICE: _ClassVar[Int8Layout]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
CODEC_UNSPECIFIED: Codec
CODEC_NONE: Codec
CODEC_FP16: Codec
CODEC_BF16: Codec
CODEC_INT8: Codec
INT8_LAYOUT_UNSPECIFIED: Int8Layout
INT8_LAYOUT_RICE: Int8Layout
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_BOOL: DType

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "codec", "data", "scales", "outlier_indices", "outlier_values", "outliers_per_row", "scale_dtype", "int8_layout", "rice_parameters", "low_bits")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_INDICES_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_VALUES_FIELD_NUMBER: _ClassVar[int]
    OUTLIERS_PER_ROW_FIELD_NUMBER: _ClassVar[int]
    SCALE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    INT8_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    RICE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LOW_BITS_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    codec: Codec
    data: bytes
    scales: bytes
    outlier_indices: bytes
    outlier_values: bytes
    outliers_per_row: int
    scale_dtype: DType
    int8_layout: Int8Layout
    rice_parameters: bytes
    low_bits: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., codec: _Optional[_Union[Codec, str]] = ..., data: _Optional[bytes] = ..., scales: _Optional[bytes] = ..., outlier_indices: _Optional[bytes] = ..., outlier_values: _Optional[bytes] = ..., outliers_per_row: _Optional[int] = ..., scale_dtype: _Optional[_Union[DType, str]] = ..., int8_layout: _Optional[_Union[Int8Layout, str]] = ..., rice_parameters: _Optional[bytes] = ..., low_bits: _Optional[bytes] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "micro_batch_id", "route", "activations", "position_ids", "attention_mask", "wire_codec", "start_session", "end_session", "model_fingerprint", "cache_edit", "logits_top_k", "reply_to", "chain_steps", "chain_route", "chain_stop_ids", "hop_bytes", "in_flight", "request_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    WIRE_CODEC_FIELD_NUMBER: _ClassVar[int]
    START_SESSION_FIELD_NUMBER: _ClassVar[int]
    END_SESSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CACHE_EDIT_FIELD_NUMBER: _ClassVar[int]
    LOGITS_TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    CHAIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ROUTE_FIELD_NUMBER: _ClassVar[int]
    CHAIN_STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    HOP_BYTES_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    micro_batch_id: int
    route: _containers.RepeatedScalarFieldContainer[str]
    activations: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    wire_codec: Codec
    start_session: bool
    end_session: bool
    model_fingerprint: str
    cache_edit: CacheEdit
    logits_top_k: int
    reply_to: str
    chain_steps: int
    chain_route: _containers.RepeatedScalarFieldContainer[str]
    chain_stop_ids: _containers.RepeatedScalarFieldContainer[int]
    hop_bytes: _containers.RepeatedScalarFieldContainer[int]
    in_flight: int
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., micro_batch_id: _Optional[int] = ..., route: _Optional[_Iterable[str]] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., wire_codec: _Optional[_Union[Codec, str]] = ..., start_session: _Optional[bool] = ..., end_session: _Optional[bool] = ..., model_fingerprint: _Optional[str] = ..., cache_edit: _Optional[_Union[CacheEdit, _Mapping]] = ..., logits_top_k: _Optional[int] = ..., reply_to: _Optional[str] = ..., chain_steps: _Optional[int] = ..., chain_route: _Optional[_Iterable[str]] = ..., chain_stop_ids: _Optional[_Iterable[int]] = ..., hop_bytes: _Optional[_Iterable[int]] = ..., in_flight: _Optional[int] = ..., request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ("collector_id",)
    COLLECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    collector_id: str
    def __init__(self, collector_id: _Optional[str] = ...) -> None: ...

class CacheEdit(_message.Message):
    __slots__ = ("keep_rows", "keep_positions", "append_sessions")
    KEEP_ROWS_FIELD_NUMBER: _ClassVar[int]
    KEEP_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    APPEND_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    keep_rows: _containers.RepeatedScalarFieldContainer[int]
    keep_positions: int
    append_sessions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keep_rows: _Optional[_Iterable[int]] = ..., keep_positions: _Optional[int] = ..., append_sessions: _Optional[_Iterable[str]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("session_id", "micro_batch_id", "logits", "status_code", "error_message", "failed_stage", "hop_bytes", "top_token_ids", "chained")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FAILED_STAGE_FIELD_NUMBER: _ClassVar[int]
    HOP_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHAINED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    micro_batch_id: int
    logits: Tensor
    status_code: int
    error_message: str
    failed_stage: str
    hop_bytes: _containers.RepeatedScalarFieldContainer[int]
    top_token_ids: Tensor
    chained: bool
    def __init__(self, session_id: _Optional[str] = ..., micro_batch_id: _Optional[int] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., status_code: _Optional[int] = ..., error_message: _Optional[str] = ..., failed_stage: _Optional[str] = ..., hop_bytes: _Optional[_Iterable[int]] = ..., top_token_ids: _Optional[_Union[Tensor, _Mapping]] = ..., chained: _Optional[bool] = ...) -> None: ...

class StopChainRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class StopChainResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("session_id", "route")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    route: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., route: _Optional[_Iterable[str]] = ...) -> None: ...

class EndSessionResponse(_message.Message):
    __slots__ = ("stages_freed",)
    STAGES_FREED_FIELD_NUMBER: _ClassVar[int]
    stages_freed: int
    def __init__(self, stages_freed: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_fingerprint", "model_type", "layer_start", "layer_end", "num_layers", "has_embeddings", "has_head", "dtype", "device", "versions", "rss_bytes", "parameter_bytes", "active_sessions", "cache_bytes", "hidden_size", "vocab_size", "max_sessions", "max_cache_bytes", "micro_batches_served", "compute_threads", "small_step_threads", "attention", "colocated_stages", "protocol_version", "weights_manifest_id", "draining", "compute_seconds")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HAS_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    HAS_HEAD_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_SERVED_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_THREADS_FIELD_NUMBER: _ClassVar[int]
    SMALL_STEP_THREADS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    COLOCATED_STAGES_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    model_type: str
    layer_start: int
    layer_end: int
    num_layers: int
    has_embeddings: bool
    has_head: bool
    dtype: str
    device: str
    versions: _containers.ScalarMap[str, str]
    rss_bytes: int
    parameter_bytes: int
    active_sessions: int
    cache_bytes: int
    hidden_size: int
    vocab_size: int
    max_sessions: int
    max_cache_bytes: int
    micro_batches_served: int
    compute_threads: int
    small_step_threads: int
    attention: str
    colocated_stages: int
    protocol_version: int
    weights_manifest_id: str
    draining: bool
    compute_seconds: float
    def __init__(self, model_fingerprint: _Optional[str] = ..., model_type: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., num_layers: _Optional[int] = ..., has_embeddings: _Optional[bool] = ..., has_head: _Optional[bool] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., versions: _Optional[_Mapping[str, str]] = ..., rss_bytes: _Optional[int] = ..., parameter_bytes: _Optional[int] = ..., active_sessions: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_sessions: _Optional[int] = ..., max_cache_bytes: _Optional[int] = ..., micro_batches_served: _Optional[int] = ..., compute_threads: _Optional[int] = ..., small_step_threads: _Optional[int] = ..., attention: _Optional[str] = ..., colocated_stages: _Optional[int] = ..., protocol_version: _Optional[int] = ..., weights_manifest_id: _Optional[str] = ..., draining: _Optional[bool] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class SetDeploymentRequest(_message.Message):
    __slots__ = ("stages",)
    STAGES_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stages: _Optional[_Iterable[str]] = ...) -> None: ...

class SetDeploymentResponse(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: int
    def __init__(self, peers: _Optional[int] = ...) -> None: ...
