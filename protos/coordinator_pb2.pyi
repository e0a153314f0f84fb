from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP: FinishReason

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "token_ids", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., token_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "model_type", "model_fingerprint", "num_layers", "vocab_size", "max_context", "max_new_tokens_limit", "compression", "stages", "has_chat_template", "batching", "weights_manifest_id")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_type: str
    model_fingerprint: str
    num_layers: int
    vocab_size: int
    max_context: int
    max_new_tokens_limit: int
    compression: str
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    has_chat_template: bool
    batching: BatchingState
    weights_manifest_id: str
    def __init__(self, model_name: _Optional[str] = ..., model_type: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., num_layers: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_context: _Optional[int] = ..., max_new_tokens_limit: _Optional[int] = ..., compression: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., has_chat_template: _Optional[bool] = ..., batching: _Optional[_Union[BatchingState, _Mapping]] = ..., weights_manifest_id: _Optional[str] = ...) -> None: ...

class BatchingState(_message.Message):
    __slots__ = ("queued", "running", "prefilling", "reserved_positions", "max_batch_rows", "max_cache_positions", "max_queue", "micro_batches", "decode_steps", "hop_bytes", "prefills", "tokens")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    PREFILLING_FIELD_NUMBER: _ClassVar[int]
    RESERVED_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHE_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    HOP_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFILLS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    queued: int
    running: int
    prefilling: int
    reserved_positions: int
    max_batch_rows: int
    max_cache_positions: int
    max_queue: int
    micro_batches: int
    decode_steps: int
    hop_bytes: int
    prefills: int
    tokens: int
    def __init__(self, queued: _Optional[int] = ..., running: _Optional[int] = ..., prefilling: _Optional[int] = ..., reserved_positions: _Optional[int] = ..., max_batch_rows: _Optional[int] = ..., max_cache_positions: _Optional[int] = ..., max_queue: _Optional[int] = ..., micro_batches: _Optional[int] = ..., decode_steps: _Optional[int] = ..., hop_bytes: _Optional[int] = ..., prefills: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("address", "layer_start", "layer_end", "dtype", "device", "active_sessions", "attention", "compute_threads", "small_step_threads", "colocated_stages", "versions", "state", "rows", "seen_seconds_ago", "down_reason", "rss_bytes", "cache_bytes", "micro_batches_served", "compute_seconds")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_THREADS_FIELD_NUMBER: _ClassVar[int]
    SMALL_STEP_THREADS_FIELD_NUMBER: _ClassVar[int]
    COLOCATED_STAGES_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SEEN_SECONDS_AGO_FIELD_NUMBER: _ClassVar[int]
    DOWN_REASON_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_SERVED_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    address: str
    layer_start: int
    layer_end: int
    dtype: str
    device: str
    active_sessions: int
    attention: str
    compute_threads: int
    small_step_threads: int
    colocated_stages: int
    versions: _containers.ScalarMap[str, str]
    state: str
    rows: int
    seen_seconds_ago: float
    down_reason: str
    rss_bytes: int
    cache_bytes: int
    micro_batches_served: int
    compute_seconds: float
    def __init__(self, address: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., active_sessions: _Optional[int] = ..., attention: _Optional[str] = ..., compute_threads: _Optional[int] = ..., small_step_threads: _Optional[int] = ..., colocated_stages: _Optional[int] = ..., versions: _Optional[_Mapping[str, str]] = ..., state: _Optional[str] = ..., rows: _Optional[int] = ..., seen_seconds_ago: _Optional[float] = ..., down_reason: _Optional[str] = ..., rss_bytes: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., micro_batches_served: _Optional[int] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("address", "layer_start", "layer_end", "model_fingerprint", "weights_manifest_id", "protocol_version", "versions", "max_sessions", "draining")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    address: str
    layer_start: int
    layer_end: int
    model_fingerprint: str
    weights_manifest_id: str
    protocol_version: int
    versions: _containers.ScalarMap[str, str]
    max_sessions: int
    draining: bool
    def __init__(self, address: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., weights_manifest_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., versions: _Optional[_Mapping[str, str]] = ..., max_sessions: _Optional[int] = ..., draining: _Optional[bool] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("renew_after_ms", "forget_after_ms", "state")
    RENEW_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    FORGET_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    renew_after_ms: int
    forget_after_ms: int
    state: str
    def __init__(self, renew_after_ms: _Optional[int] = ..., forget_after_ms: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...
