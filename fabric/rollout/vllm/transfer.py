"""The vLLM side of a weight update, through vLLM's supported weight-transfer hooks.

`SharedMemoryWeightTransferEngine` is registered in vLLM's WeightTransferEngineFactory as backend "fabric_shm"
(a vLLM general plugin, see pyproject's `vllm.general_plugins` entry point, so the engine-core process registers it
too). Its update_info names a staging file (fabric.weights.staging): the worker maps it and loads the tensors inside
vLLM's layerwise reload, which is what the CPU backend's repacked weights need (DESIGN.md).

`commit()` drives vLLM's four phases on an AsyncLLM with generation paused in "keep" mode: running requests are
frozen, not lost, and continue on the new weights when generation resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BACKEND = "fabric_shm"


def register() -> None:
    """vLLM general-plugin hook; runs in every vLLM process, possibly more than once."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "SharedMemoryWeightTransferEngine")


def _engine_classes():
    # Defined lazily: importing vLLM's base classes at module import would make `register` slow to import.
    import torch
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    from fabric.weights.staging import tensors_from_update_info

    @dataclass
    class SharedMemoryInitInfo(WeightTransferInitInfo):
        pass

    @dataclass
    class SharedMemoryUpdateInfo(WeightTransferUpdateInfo):
        path: str = ""
        size: int = 0
        tensors: list = field(default_factory=list)
        # Tied embeddings: also load the input embedding as lm_head.weight, or the head would stay stale.
        tie_lm_head: bool = False

    class SharedMemoryWeightTransferEngine(WeightTransferEngine[SharedMemoryInitInfo, SharedMemoryUpdateInfo]):
        init_info_cls = SharedMemoryInitInfo
        update_info_cls = SharedMemoryUpdateInfo
        supports_draft_weight_update = False

        def init_transfer_engine(self, init_info: SharedMemoryInitInfo) -> None:
            pass  # nothing to connect: the staging file is named in every update

        def start_weight_update(self) -> None:
            initialize_layerwise_reload(self.model)

        def update_weights(self, update_info: dict[str, Any]) -> None:
            self.receive_weights(self.parse_update_info(update_info))
            if torch.accelerator.is_available():
                torch.accelerator.synchronize()

        def receive_weights(self, update_info: SharedMemoryUpdateInfo) -> None:
            info = {"path": update_info.path, "size": update_info.size, "tensors": update_info.tensors}

            def named():
                for name, tensor in tensors_from_update_info(info):
                    yield name, tensor
                    if update_info.tie_lm_head and name == "model.embed_tokens.weight":
                        yield "lm_head.weight", tensor

            self.model.load_weights(weights=named())

        def finish_weight_update(self) -> None:
            finalize_layerwise_reload(self.model, self.model_config)

        def shutdown(self) -> None:
            pass

    return SharedMemoryWeightTransferEngine


def __getattr__(name: str):
    if name == "SharedMemoryWeightTransferEngine":
        return _engine_classes()
    raise AttributeError(name)


def engine_args() -> dict:
    """The engine arguments that switch a vLLM engine to this backend."""
    register()
    return {"weight_transfer_config": {"backend": BACKEND}}


async def commit(engine, update_info: dict, version: int) -> None:
    """Loads a staged version into a running AsyncLLM: pause (keep requests), load, resume."""
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    await engine.pause_generation(mode="keep", clear_cache=True)
    try:
        await engine.start_weight_update()
        try:
            await engine.update_weights(WeightTransferUpdateRequest(update_info=update_info))
        except BaseException:
            # End the update inside the engine whatever failed: left open, the next update is refused ("already
            # active") and the engine dies later. Layers that loaded nothing keep their weights; the receiver
            # loads the serving version again for the rest (fabric.weights.versions).
            await engine.finish_weight_update()
            raise
        await engine.finish_weight_update(weight_version=str(version))
    finally:
        await engine.resume_generation()
