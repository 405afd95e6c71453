"""Runs megatron-core 0.16.1 on a CPU-only torch, and sets up torch.distributed + megatron's parallel state.

megatron-core assumes CUDA in a handful of places even with the local (no Transformer Engine) layer spec and
`use_cpu_initialization=True`. When CUDA is absent, and only then, `apply_cpu_compat()` redirects exactly these:

1. `torch.cuda.current_device()` returns `torch.device("cpu")`. megatron passes it as `device=` when it builds rotary
   frequencies, attention masks and scratch buffers; with CPU there these land where the model lives.
2. The model-parallel RNG tracker (`tensor_parallel.random`) keeps its named states with the CPU generator
   instead of `torch.cuda.get_rng_state/set_rng_state`. The tracker forks around attention dropout on every
   forward, so without this a forward pass fails even with dropout at 0.
3. Activation recompute (megatron's CheckpointFunction) saves and restores the RNG states around the recomputed
   forward pass; without CUDA it saves the CPU generator and the tracker's states only.
4. The causal masks `fused_softmax` builds when no attention mask is given (`get_default_causal_mask`,
   `get_sliding_window_causal_mask`) hard-code `device="cuda"`; they are rebuilt on the CPU.

Nothing else is changed; on a CUDA host `apply_cpu_compat()` does nothing and megatron runs unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# megatron warns about these on every import when apex / Transformer Engine are absent (by design here).
for _message in ("Apex is not installed", "Transformer Engine and Apex are not installed"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)

_cpu_compat_applied = False
_initialized_with: tuple[int, int] | None = None


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


@functools.lru_cache(maxsize=32)
def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    ones = torch.ones(sq, skv, dtype=torch.bool)
    upper = torch.triu(ones, diagonal=skv - sq - window_size[0])
    return ~torch.tril(upper, diagonal=skv - sq + window_size[1])


def _make_cpu_rng_tracker():
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """megatron's RNG tracker with the CPU generator standing in for the CUDA one (same named states)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    return CpuRNGStatesTracker


def _cpu_get_all_rng_states():
    from megatron.core.tensor_parallel import random as mp_random

    return torch.get_rng_state(), None, mp_random.get_cuda_rng_tracker().get_states()


def _cpu_set_all_rng_states(cpu_rng_state, _cuda_rng_state, tracker_states) -> None:
    from megatron.core.tensor_parallel import random as mp_random

    torch.set_rng_state(cpu_rng_state)
    mp_random.get_cuda_rng_tracker().set_states(tracker_states)


def apply_cpu_compat() -> bool:
    """Applies the redirections above when CUDA is absent (idempotent). Returns True when they are in effect."""
    global _cpu_compat_applied
    if torch.cuda.is_available():
        return False
    if _cpu_compat_applied:
        return True
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import utils as transformer_utils

    torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]  # megatron passes it to torch as a device
    for module in (transformer_utils, fused_softmax):  # fused_softmax imported the functions by name
        module.get_default_causal_mask = _cpu_default_causal_mask
        module.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask
    tracker_class = _make_cpu_rng_tracker()
    mp_random.CudaRNGStatesTracker = tracker_class  # what initialize_rng_tracker instantiates
    mp_random._CUDA_RNG_STATE_TRACKER = tracker_class()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random._get_all_rng_states = _cpu_get_all_rng_states  # what CheckpointFunction (recompute) calls
    mp_random._set_all_rng_states = _cpu_set_all_rng_states
    _cpu_compat_applied = True
    log.info("megatron CPU compatibility applied: current_device -> cpu, CPU RNG tracker and recompute, CPU masks")
    return True


def init_megatron(tp: int | None = None, pp: int | None = None, seed: int = 1234) -> None:
    """Initializes torch.distributed and megatron's parallel state once per process; later calls are no-ops.

    tp / pp default to 1 on the first call and to "whatever is initialized" after it; asking for other sizes than
    the initialized ones raises. seed counts on the first call only. Under torchrun (WORLD_SIZE and MASTER_ADDR set)
    the env:// rendezvous is used; otherwise a world of size 1 on a TCP store that binds a free port of
    127.0.0.1 itself (port 0: no race with other processes). The backend is nccl with CUDA, gloo without.
    """
    global _initialized_with
    if _initialized_with is not None:
        wanted = (tp or _initialized_with[0], pp or _initialized_with[1])
        if wanted != _initialized_with:
            raise RuntimeError(
                f"megatron is already initialized with tp={_initialized_with[0]} pp={_initialized_with[1]}; "
                f"cannot re-initialize with tp={wanted[0]} pp={wanted[1]} in the same process"
            )
        return
    tp, pp = tp or 1, pp or 1
    apply_cpu_compat()
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
        else:
            store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
    if dist.get_world_size() % (tp * pp) != 0:
        raise ValueError(f"world size {dist.get_world_size()} is not divisible by tp*pp = {tp * pp}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    _initialized_with = (tp, pp)
