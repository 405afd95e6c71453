from fabric.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "response", "ground_truth", "reward_name", "response_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_FIELD_NUMBER: _ClassVar[int]
    REWARD_NAME_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    response: str
    ground_truth: str
    reward_name: str
    response_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., response: _Optional[str] = ..., ground_truth: _Optional[str] = ..., reward_name: _Optional[str] = ..., response_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "score", "token_level_rewards", "reward_name", "error", "info", "correct")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LEVEL_REWARDS_FIELD_NUMBER: _ClassVar[int]
    REWARD_NAME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    score: float
    token_level_rewards: _containers.RepeatedScalarFieldContainer[float]
    reward_name: str
    error: _common_pb2.Error
    info: str
    correct: float
    def __init__(self, request_id: _Optional[str] = ..., score: _Optional[float] = ..., token_level_rewards: _Optional[_Iterable[float]] = ..., reward_name: _Optional[str] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ..., info: _Optional[str] = ..., correct: _Optional[float] = ...) -> None: ...

class RewardServiceGetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScorerInfo(_message.Message):
    __slots__ = ("reward_name", "worker_cls", "infer_batch_size", "model", "device", "items_scored", "batches_scored", "tag_included")
    REWARD_NAME_FIELD_NUMBER: _ClassVar[int]
    WORKER_CLS_FIELD_NUMBER: _ClassVar[int]
    INFER_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_SCORED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_SCORED_FIELD_NUMBER: _ClassVar[int]
    TAG_INCLUDED_FIELD_NUMBER: _ClassVar[int]
    reward_name: str
    worker_cls: str
    infer_batch_size: int
    model: str
    device: str
    items_scored: int
    batches_scored: int
    tag_included: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, reward_name: _Optional[str] = ..., worker_cls: _Optional[str] = ..., infer_batch_size: _Optional[int] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., items_scored: _Optional[int] = ..., batches_scored: _Optional[int] = ..., tag_included: _Optional[_Iterable[str]] = ...) -> None: ...

class RewardServiceGetServerInfoResponse(_message.Message):
    __slots__ = ("scorers", "queue_depth", "server")
    SCORERS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    scorers: _containers.RepeatedCompositeFieldContainer[ScorerInfo]
    queue_depth: int
    server: str
    def __init__(self, scorers: _Optional[_Iterable[_Union[ScorerInfo, _Mapping]]] = ..., queue_depth: _Optional[int] = ..., server: _Optional[str] = ...) -> None: ...
