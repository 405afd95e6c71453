from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINER_STATE_UNSPECIFIED: _ClassVar[TrainerState]
    TRAINER_STATE_STARTING: _ClassVar[TrainerState]
    TRAINER_STATE_RUNNING: _ClassVar[TrainerState]
    TRAINER_STATE_PAUSED: _ClassVar[TrainerState]
    TRAINER_STATE_STOPPING: _ClassVar[TrainerState]
    TRAINER_STATE_FINISHED: _ClassVar[TrainerState]
    TRAINER_STATE_FAILED: _ClassVar[TrainerState]
TRAINER_STATE_UNSPECIFIED: TrainerState
TRAINER_STATE_STARTING: TrainerState
TRAINER_STATE_RUNNING: TrainerState
TRAINER_STATE_PAUSED: TrainerState
TRAINER_STATE_STOPPING: TrainerState
TRAINER_STATE_FINISHED: TrainerState
TRAINER_STATE_FAILED: TrainerState

class StepMetrics(_message.Message):
    __slots__ = ("step", "weight_version", "reward_mean", "reward_std", "loss", "kl", "tokens_per_second", "generate_seconds", "reward_seconds", "train_seconds", "weight_sync_seconds", "step_seconds", "logprob_mismatch", "samples", "stale_samples", "response_length_mean", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    REWARD_STD_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    GENERATE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SYNC_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STALE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_LENGTH_MEAN_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    step: int
    weight_version: int
    reward_mean: float
    reward_std: float
    loss: float
    kl: float
    tokens_per_second: float
    generate_seconds: float
    reward_seconds: float
    train_seconds: float
    weight_sync_seconds: float
    step_seconds: float
    logprob_mismatch: float
    samples: int
    stale_samples: int
    response_length_mean: float
    extra: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., weight_version: _Optional[int] = ..., reward_mean: _Optional[float] = ..., reward_std: _Optional[float] = ..., loss: _Optional[float] = ..., kl: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., generate_seconds: _Optional[float] = ..., reward_seconds: _Optional[float] = ..., train_seconds: _Optional[float] = ..., weight_sync_seconds: _Optional[float] = ..., step_seconds: _Optional[float] = ..., logprob_mismatch: _Optional[float] = ..., samples: _Optional[int] = ..., stale_samples: _Optional[int] = ..., response_length_mean: _Optional[float] = ..., extra: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("state", "step", "max_steps", "weight_version", "last_metrics", "message")
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_METRICS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    state: TrainerState
    step: int
    max_steps: int
    weight_version: int
    last_metrics: StepMetrics
    message: str
    def __init__(self, state: _Optional[_Union[TrainerState, str]] = ..., step: _Optional[int] = ..., max_steps: _Optional[int] = ..., weight_version: _Optional[int] = ..., last_metrics: _Optional[_Union[StepMetrics, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class WatchMetricsRequest(_message.Message):
    __slots__ = ("since_step",)
    SINCE_STEP_FIELD_NUMBER: _ClassVar[int]
    since_step: int
    def __init__(self, since_step: _Optional[int] = ...) -> None: ...

class WatchMetricsResponse(_message.Message):
    __slots__ = ("metrics",)
    METRICS_FIELD_NUMBER: _ClassVar[int]
    metrics: StepMetrics
    def __init__(self, metrics: _Optional[_Union[StepMetrics, _Mapping]] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PauseResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: TrainerState
    def __init__(self, state: _Optional[_Union[TrainerState, str]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: TrainerState
    def __init__(self, state: _Optional[_Union[TrainerState, str]] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("path", "step", "weight_version")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    path: str
    step: int
    weight_version: int
    def __init__(self, path: _Optional[str] = ..., step: _Optional[int] = ..., weight_version: _Optional[int] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("save_checkpoint",)
    SAVE_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    save_checkpoint: bool
    def __init__(self, save_checkpoint: _Optional[bool] = ...) -> None: ...

class StopResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: TrainerState
    def __init__(self, state: _Optional[_Union[TrainerState, str]] = ...) -> None: ...
