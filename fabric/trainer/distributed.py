"""The trainer across processes: megatron-core data x tensor parallel on torch.distributed, launched by torchrun.

    torchrun --nproc-per-node 8 -m fabric.trainer --config rlvr.yaml     # or: fabric train --nproc-per-node 8 ...

Every rank runs the same setup (the policy's shard, the supervised warm-up, the reference): `Policy` is collective,
each call made by every rank with the same whole batch; each rank works on its data-parallel share of the rows and
megatron-core's DistributedDataParallel reduces the gradients. Rank 0 alone holds the control plane (the rollout and
reward pools, the TrainerService, the `Trainer`); it drives the others through `LeaderPolicy`, which broadcasts every
call on a gloo control group before making it itself, and the others (`follow`) make the same call when told.
So the loop (loop.py) is unchanged: it sees a Policy.

The sizes come from ROLL's keys, `actor_train.strategy_args.strategy_config`: `tensor_model_parallel_size`,
`pipeline_model_parallel_size` (1 only, for now), and the data-parallel size is what is left of the world
(ROLL's rule: world = dp x tp x pp). NCCL with CUDA, gloo without (compat.init_megatron).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fabric.config import ConfigError

log = logging.getLogger(__name__)

STRATEGY_CONFIG = "actor_train.strategy_args.strategy_config"
# ROLL's megatron strategy_config keys the fabric reads; parallelisms it lacks are refused unless 1, and any other key
# (megatron's memory and speed knobs) is named in one warning line.
PARALLEL_KEYS = {
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "virtual_pipeline_model_parallel_size": None,
    "context_parallel_size": 1,
    "expert_model_parallel_size": 1,
    "sequence_parallel": False,
    "use_distributed_optimizer": False,
}
IGNORED_KEYS = {  # performance knobs of ROLL's megatron strategy with no effect on the result
    "recompute_granularity", "recompute_method", "recompute_num_layers", "overlap_grad_reduce",
    "overlap_param_gather", "bf16", "fp16", "use_precision_aware_optimizer", "distribute_saved_activations",
}  # fmt: skip
CONTROL_TIMEOUT = datetime.timedelta(days=30)  # followers wait on the control group through pauses and long steps


@dataclass(frozen=True)
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline

    def data(self, world_size: int) -> int:
        if world_size % self.model_parallel:
            raise ConfigError(
                STRATEGY_CONFIG,
                f"the world of {world_size} process(es) does not split into tensor_model_parallel_size x "
                f"pipeline_model_parallel_size = {self.model_parallel}: start a multiple of it",
            )
        return world_size // self.model_parallel


def parallel_config(cfg) -> ParallelConfig:
    """ROLL's `actor_train.strategy_args.strategy_config` sizes; ConfigError naming the key for what is refused."""
    from omegaconf import OmegaConf

    section = OmegaConf.select(cfg, STRATEGY_CONFIG, default=None)
    values = {} if section is None else OmegaConf.to_container(section, resolve=True)
    if not isinstance(values, dict):
        raise ConfigError(STRATEGY_CONFIG, "must be a mapping")
    unused = sorted(str(k) for k in values if k not in PARALLEL_KEYS and k not in IGNORED_KEYS)
    sizes = {}
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        value = values.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{STRATEGY_CONFIG}.{key}", f"must be an integer >= 1, got {value!r}")
        sizes[key] = value
    if sizes["pipeline_model_parallel_size"] != 1:
        raise ConfigError(
            f"{STRATEGY_CONFIG}.pipeline_model_parallel_size",
            "pipeline parallelism is not implemented yet: use 1 (tensor x data parallel)",
        )
    for key in ("virtual_pipeline_model_parallel_size", "context_parallel_size", "expert_model_parallel_size"):
        if values.get(key) not in (None, 1):
            raise ConfigError(f"{STRATEGY_CONFIG}.{key}", "not implemented: leave it unset or 1")
    # memory savers that do not change the result: accepted, not applied yet
    unused += [str(k) for k in ("sequence_parallel", "use_distributed_optimizer") if values.get(k)]
    if unused:
        log.warning("%s: not applied by the fabric's trainer: %s", STRATEGY_CONFIG, ", ".join(unused))
    return ParallelConfig(sizes["tensor_model_parallel_size"], sizes["pipeline_model_parallel_size"])


def launched() -> bool:
    """True under torchrun (or any launcher that sets the same environment)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def env_world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) without one."""
    if not launched():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def init(parallel: ParallelConfig, seed: int) -> None:
    """torch.distributed + megatron's parallel state at these sizes (ConfigError when the world does not split)."""
    from fabric.trainer.compat import init_megatron

    parallel.data(env_world()[1])
    init_megatron(tp=parallel.tensor, pp=parallel.pipeline, seed=seed)


# ---- where this rank sits -------------------------------------------------------------------------------------


def world() -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_leader() -> bool:
    return world()[0] == 0


def data_parallel() -> tuple[int, int]:
    """(data-parallel rank, size); (0, 1) before megatron is initialized."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def in_first_replica() -> bool:
    """True on the ranks of data-parallel replica 0: the ones that assemble the HF weights (the TP gather)."""
    return data_parallel()[0] == 0


def row_range(rows: int) -> tuple[int, int]:
    """This data-parallel rank's contiguous share [start, stop) of `rows` (torch.tensor_split's sizes)."""
    rank, size = data_parallel()
    base, extra = divmod(rows, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_rows(local: torch.Tensor, rows: int) -> torch.Tensor:
    """Every data-parallel rank's share (row_range) of a [rows, ...] tensor, in rank order, on every rank."""
    from megatron.core import parallel_state

    rank, size = data_parallel()
    if size == 1:
        return local
    per = -(-rows // size)
    padded = local.new_zeros((per, *local.shape[1:]))
    padded[: local.shape[0]] = local
    out = local.new_empty((per * size, *local.shape[1:]))
    dist.all_gather_into_tensor(out, padded.contiguous(), group=parallel_state.get_data_parallel_group())
    base, extra = divmod(rows, size)
    parts = [out[r * per : r * per + base + (1 if r < extra else 0)] for r in range(size)]
    return torch.cat(parts)


def sum_over_data_parallel(values: dict[str, float], device) -> dict[str, float]:
    """Sums each value over the data-parallel ranks (the keys must be the same on every rank)."""
    from megatron.core import parallel_state

    if data_parallel()[1] == 1 or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
    return dict(zip(keys, tensor.tolist(), strict=True))


# ---- the mini-batch across data-parallel ranks ----------------------------------------------------------------


def data_parallel_algorithm(algorithm, samples_per_step: int):
    """The algorithm config with ROLL's global mini-batch: per_device_train_batch_size x gradient_accumulation_steps
    x the data-parallel size samples per optimizer step (the loop and the LR schedule read `mini_batch_size`)."""
    dp = data_parallel()[1]
    if dp == 1:
        return algorithm
    cls = type(f"DataParallel{type(algorithm).__name__}", (type(algorithm),), {})
    cls.mini_batch_size = property(  # type: ignore[attr-defined]
        lambda self: self.per_device_train_batch_size * self.gradient_accumulation_steps * dp
    )
    scaled = cls(**{f.name: getattr(algorithm, f.name) for f in dataclasses.fields(algorithm)})
    if samples_per_step % scaled.mini_batch_size:
        raise ConfigError(
            "actor_train.training_args.gradient_accumulation_steps",
            f"a step's {samples_per_step} samples do not split into mini-batches of per_device_train_batch_size x "
            f"gradient_accumulation_steps x {dp} data-parallel ranks = {scaled.mini_batch_size}",
        )
    return scaled


# ---- rank 0 drives, the others follow ------------------------------------------------------------------------


class Control:
    """The control group (gloo, CPU objects, whatever the compute backend) on which rank 0 broadcasts each call."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if world()[1] > 1 else None
        self.lock = threading.Lock()  # one call at a time, its collectives included

    def send(self, message) -> None:
        if self.group is not None:
            dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self):
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def stop_followers(self) -> None:
        with self.lock:
            self.send(("stop",))


class LeaderPolicy:
    """Rank 0's view of a collective Policy: each call is broadcast to the followers, then made here too."""

    CALLS = ("logprobs", "train_step", "sft_step", "save", "save_distributed", "load_distributed", "reset_optimizer")

    def __init__(self, name: str, policy, control: Control):
        self._name, self._policy, self._control = name, policy, control

    def __getattr__(self, attribute):
        if attribute in self.CALLS:

            def call(*args, **kwargs):
                with self._control.lock:
                    self._control.send(("call", self._name, attribute, args, kwargs))
                    return getattr(self._policy, attribute)(*args, **kwargs)

            return call
        return getattr(self._policy, attribute)

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The HF weights, TP shards gathered bucket by bucket in the first replica; the caller consumes them all."""
        with self._control.lock:
            self._control.send(("call", self._name, "hf_weights", (), {}))
            yield from self._policy.hf_weights()

    def frozen_copy(self):
        raise RuntimeError("make the frozen copy on every rank (before the leader takes over), not through the leader")


def follow(policies: dict, control: Control) -> int:
    """A follower's loop: makes each call rank 0 broadcasts until it says stop. Returns the number of calls."""
    calls = 0
    while True:
        message = control.receive()
        if message[0] == "stop":
            return calls
        _, name, method, args, kwargs = message
        result = getattr(policies[name], method)(*args, **kwargs)
        if method == "hf_weights":
            for _ in result:  # take part in the TP gathers; rank 0 sends
                pass
        calls += 1


@contextlib.contextmanager
def leading(policies: dict, control: Control):
    """On rank 0: LeaderPolicy views of `policies`; the followers are told to stop when the block ends, however."""
    try:
        yield {name: LeaderPolicy(name, policy, control) for name, policy in policies.items()}
    finally:
        control.stop_followers()


# ---- launching ------------------------------------------------------------------------------------------------


def torchrun_command(nproc_per_node: int, fabric_args: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m fabric.trainer ARGS` (one node)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        "-m",
        "fabric.trainer",
        *fabric_args,
    ]


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without `--nproc-per-node N` / `--nproc-per-node=N` (what the torchrun'd ranks are given)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            out.append(arg)
    return out
