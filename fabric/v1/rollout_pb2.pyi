from fabric.v1 import common_pb2 as _common_pb2
from fabric.v1 import weights_pb2 as _weights_pb2
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
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]

class SleepState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLEEP_STATE_UNSPECIFIED: _ClassVar[SleepState]
    SLEEP_STATE_AWAKE: _ClassVar[SleepState]
    SLEEP_STATE_ASLEEP: _ClassVar[SleepState]
    SLEEP_STATE_WEIGHTS_ONLY: _ClassVar[SleepState]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason
SLEEP_STATE_UNSPECIFIED: SleepState
SLEEP_STATE_AWAKE: SleepState
SLEEP_STATE_ASLEEP: SleepState
SLEEP_STATE_WEIGHTS_ONLY: SleepState

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "num_return_sequences", "seed", "logprobs", "stop", "repetition_penalty")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    NUM_BEAMS_FIELD_NUMBER: _ClassVar[int]
    NUM_RETURN_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    num_beams: int
    num_return_sequences: int
    seed: int
    logprobs: bool
    stop: _containers.RepeatedScalarFieldContainer[str]
    repetition_penalty: float
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., num_beams: _Optional[int] = ..., num_return_sequences: _Optional[int] = ..., seed: _Optional[int] = ..., logprobs: _Optional[bool] = ..., stop: _Optional[_Iterable[str]] = ..., repetition_penalty: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "prompt_token_ids", "sampling", "session_key")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    session_key: str
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., session_key: _Optional[str] = ...) -> None: ...

class GenerateBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[GenerateRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[GenerateRequest, _Mapping]]] = ...) -> None: ...

class GenerateBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[GenerateResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[GenerateResponse, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "sample_index", "token_ids", "text", "logprobs", "finish_reason", "weight_version", "prompt_token_ids", "error", "server", "first_weight_version", "last_weight_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    FIRST_WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sample_index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: FinishReason
    weight_version: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    error: _common_pb2.Error
    server: str
    first_weight_version: int
    last_weight_version: int
    def __init__(self, request_id: _Optional[str] = ..., sample_index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., weight_version: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ..., server: _Optional[str] = ..., first_weight_version: _Optional[int] = ..., last_weight_version: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("aborted_request_ids",)
    ABORTED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    aborted_request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, aborted_request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateWeightsRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateWeightsHeader
    chunk: _weights_pb2.WeightChunk
    def __init__(self, header: _Optional[_Union[UpdateWeightsHeader, _Mapping]] = ..., chunk: _Optional[_Union[_weights_pb2.WeightChunk, _Mapping]] = ...) -> None: ...

class UpdateWeightsHeader(_message.Message):
    __slots__ = ("weight_version", "manifest", "relay_targets", "chunk_indices", "transport", "collective", "ipc", "tensor_digests")
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    RELAY_TARGETS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDICES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_FIELD_NUMBER: _ClassVar[int]
    IPC_FIELD_NUMBER: _ClassVar[int]
    TENSOR_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    weight_version: int
    manifest: _weights_pb2.WeightManifest
    relay_targets: _containers.RepeatedScalarFieldContainer[str]
    chunk_indices: _containers.RepeatedScalarFieldContainer[int]
    transport: str
    collective: CollectiveRendezvous
    ipc: IpcHandles
    tensor_digests: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, weight_version: _Optional[int] = ..., manifest: _Optional[_Union[_weights_pb2.WeightManifest, _Mapping]] = ..., relay_targets: _Optional[_Iterable[str]] = ..., chunk_indices: _Optional[_Iterable[int]] = ..., transport: _Optional[str] = ..., collective: _Optional[_Union[CollectiveRendezvous, _Mapping]] = ..., ipc: _Optional[_Union[IpcHandles, _Mapping]] = ..., tensor_digests: _Optional[_Iterable[bytes]] = ...) -> None: ...

class IpcHandles(_message.Message):
    __slots__ = ("gpu_uuid", "tensors")
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    gpu_uuid: str
    tensors: bytes
    def __init__(self, gpu_uuid: _Optional[str] = ..., tensors: _Optional[bytes] = ...) -> None: ...

class CollectiveRendezvous(_message.Message):
    __slots__ = ("backend", "store_address", "world_size", "rank", "bucket_bytes", "timeout_s", "group_id", "secret")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    BUCKET_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    backend: str
    store_address: str
    world_size: int
    rank: int
    bucket_bytes: int
    timeout_s: float
    group_id: str
    secret: str
    def __init__(self, backend: _Optional[str] = ..., store_address: _Optional[str] = ..., world_size: _Optional[int] = ..., rank: _Optional[int] = ..., bucket_bytes: _Optional[int] = ..., timeout_s: _Optional[float] = ..., group_id: _Optional[str] = ..., secret: _Optional[str] = ...) -> None: ...

class UpdateWeightsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[WeightUpdateResult]
    def __init__(self, results: _Optional[_Iterable[_Union[WeightUpdateResult, _Mapping]]] = ...) -> None: ...

class WeightUpdateResult(_message.Message):
    __slots__ = ("server", "weight_version", "committed", "already_committed", "bytes_received", "seconds", "commit_seconds", "error", "transport", "transport_reason")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_REASON_FIELD_NUMBER: _ClassVar[int]
    server: str
    weight_version: int
    committed: bool
    already_committed: bool
    bytes_received: int
    seconds: float
    commit_seconds: float
    error: _common_pb2.Error
    transport: str
    transport_reason: str
    def __init__(self, server: _Optional[str] = ..., weight_version: _Optional[int] = ..., committed: _Optional[bool] = ..., already_committed: _Optional[bool] = ..., bytes_received: _Optional[int] = ..., seconds: _Optional[float] = ..., commit_seconds: _Optional[float] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ..., transport: _Optional[str] = ..., transport_reason: _Optional[str] = ...) -> None: ...

class GetWeightsStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetWeightsStatusResponse(_message.Message):
    __slots__ = ("serving_version", "staged_version", "staged_manifest_digest", "staged_chunk_indices", "total_chunks", "tcp_data_port", "serving_manifest_digest", "dtype", "transports")
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGED_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGED_MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STAGED_CHUNK_INDICES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TCP_DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    SERVING_MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    serving_version: int
    staged_version: int
    staged_manifest_digest: str
    staged_chunk_indices: _containers.RepeatedScalarFieldContainer[int]
    total_chunks: int
    tcp_data_port: int
    serving_manifest_digest: str
    dtype: str
    transports: _containers.RepeatedCompositeFieldContainer[WeightTransportOffer]
    def __init__(self, serving_version: _Optional[int] = ..., staged_version: _Optional[int] = ..., staged_manifest_digest: _Optional[str] = ..., staged_chunk_indices: _Optional[_Iterable[int]] = ..., total_chunks: _Optional[int] = ..., tcp_data_port: _Optional[int] = ..., serving_manifest_digest: _Optional[str] = ..., dtype: _Optional[str] = ..., transports: _Optional[_Iterable[_Union[WeightTransportOffer, _Mapping]]] = ...) -> None: ...

class WeightTransportOffer(_message.Message):
    __slots__ = ("name", "port", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    port: int
    params: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., port: _Optional[int] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SleepRequest(_message.Message):
    __slots__ = ("level",)
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    level: int
    def __init__(self, level: _Optional[int] = ...) -> None: ...

class SleepResponse(_message.Message):
    __slots__ = ("state", "level")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    state: SleepState
    level: int
    def __init__(self, state: _Optional[_Union[SleepState, str]] = ..., level: _Optional[int] = ...) -> None: ...

class WakeUpRequest(_message.Message):
    __slots__ = ("tags",)
    TAGS_FIELD_NUMBER: _ClassVar[int]
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tags: _Optional[_Iterable[str]] = ...) -> None: ...

class WakeUpResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: SleepState
    def __init__(self, state: _Optional[_Union[SleepState, str]] = ...) -> None: ...

class RolloutServiceGetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RolloutServiceGetServerInfoResponse(_message.Message):
    __slots__ = ("model", "engine_config_json", "weight_version", "queue_depth", "running_requests", "sleep_state", "sleep_level", "max_model_len", "vocab_size", "infer_batch_size", "generating_args_json", "server", "engine_version", "device_memory_free_bytes", "device_memory_total_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SLEEP_STATE_FIELD_NUMBER: _ClassVar[int]
    SLEEP_LEVEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    INFER_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GENERATING_ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    engine_config_json: str
    weight_version: int
    queue_depth: int
    running_requests: int
    sleep_state: SleepState
    sleep_level: int
    max_model_len: int
    vocab_size: int
    infer_batch_size: int
    generating_args_json: str
    server: str
    engine_version: str
    device_memory_free_bytes: int
    device_memory_total_bytes: int
    def __init__(self, model: _Optional[str] = ..., engine_config_json: _Optional[str] = ..., weight_version: _Optional[int] = ..., queue_depth: _Optional[int] = ..., running_requests: _Optional[int] = ..., sleep_state: _Optional[_Union[SleepState, str]] = ..., sleep_level: _Optional[int] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., infer_batch_size: _Optional[int] = ..., generating_args_json: _Optional[str] = ..., server: _Optional[str] = ..., engine_version: _Optional[str] = ..., device_memory_free_bytes: _Optional[int] = ..., device_memory_total_bytes: _Optional[int] = ...) -> None: ...
