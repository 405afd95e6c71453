"""`Policy`: a megatron GPTModel plus its optimizer, the unit the RL loop trains, reads logprobs from and syncs.

    policy = Policy.from_hf(model_dir, OptimConfig(lr=1e-5), LossConfig(pg_clip=0.2, kl_coef=0.01))
    reference = policy.frozen_copy()                       # for ref_logprobs
    batch = TrainBatch.from_token_lists(prompt_ids, response_ids, pad_id=tokenizer.pad_token_id)
    batch.old_logprobs = policy.logprobs(batch); batch.ref_logprobs = reference.logprobs(batch)
    batch.advantages = grpo_advantages(rewards, group_size)
    metrics = policy.train_step(batch)
    for name, tensor in policy.hf_weights(): ...          # stream to rollout servers
    policy.save(out_dir)                                  # HF checkpoint for transformers / vLLM

The optimizer is plain `torch.optim.AdamW` over the megatron model's parameters, not megatron's
DistributedOptimizer: that one needs megatron's DDP wrapper with CUDA grad buffers and fused Adam from apex or
Transformer Engine, none of which runs on the CPU-only hosts here, while AdamW runs unchanged on CPU and CUDA
(fused on CUDA). At data-parallel size 1 and TP 1 the two compute the same update; for DP > 1 the next step is
megatron's DDP wrapper (gradient all-reduce) and for TP > 1 a TP-aware grad norm (megatron's optimizer has both).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from fabric.trainer import losses
from fabric.trainer.compat import init_megatron
from fabric.trainer.model import build_gpt_model, iter_hf_weights, load_hf_into_megatron
from fabric.trainer.model import save_hf_checkpoint as _save_hf_checkpoint


@dataclass
class TrainBatch:
    """Right-padded prompt + response token ids and per-token RL data, all [B, T] aligned as in `losses`.

    old_logprobs None means on-policy (the ratio is 1: the current logprobs, detached). advantages are [B] or [B, T].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    @classmethod
    def from_token_lists(
        cls, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
    ) -> TrainBatch:
        """Concatenates each prompt with its response and right-pads to the longest."""
        if len(prompts) != len(responses) or not prompts:
            raise ValueError(f"need as many prompts as responses (got {len(prompts)} and {len(responses)}), >= 1")
        length = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
        input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        response_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            if not prompt:
                raise ValueError(f"prompt {row} is empty; every sequence needs at least one prompt token")
            end = len(prompt) + len(response)
            input_ids[row, :end] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
            attention_mask[row, :end] = 1
            response_mask[row, len(prompt) : end] = 1
        return cls(input_ids, attention_mask, response_mask)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def validate(self) -> None:
        shape = tuple(self.input_ids.shape)
        if len(shape) != 2:
            raise ValueError(f"input_ids must be [batch, seq], got {shape}")
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "advantages" and value.ndim == 1:
                if value.shape[0] != shape[0]:
                    raise ValueError(f"advantages has {value.shape[0]} items for a batch of {shape[0]}")
            elif tuple(value.shape) != shape:
                raise ValueError(f"{f.name} has shape {tuple(value.shape)}, input_ids {shape}; they must match")
        losses.check_right_padded(self.attention_mask)
        if (self.response_mask.bool() & ~self.attention_mask.bool()).any():
            raise ValueError("response_mask marks padding as response; it must lie inside attention_mask")

    def slice(self, start: int, stop: int) -> TrainBatch:
        return TrainBatch(**{f.name: _rows(getattr(self, f.name), start, stop) for f in fields(self)})

    def to(self, device) -> TrainBatch:
        return TrainBatch(
            **{f.name: (None if (v := getattr(self, f.name)) is None else v.to(device)) for f in fields(self)}
        )


def _rows(value: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if value is None else value[start:stop]


def clip_grad_norm(model, max_norm: float | None) -> float:
    """The global L2 norm of the gradients over all tensor-parallel ranks; scales them down to max_norm if above.

    Like torch's clip_grad_norm_, but each TP-sharded gradient counts once per shard and each replicated one
    (norms, biases of row-parallel layers) once in all, so every TP rank computes the same norm and clips alike.
    (megatron's own clip_grads asserts CUDA tensors, so it cannot serve on CPU.)
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    squares = torch.zeros((), dtype=torch.float32, device=params[0].grad.device)
    for param in params:
        if param_is_not_tensor_parallel_duplicate(param):
            squares += param.grad.detach().float().square().sum()
    group = parallel_state.get_model_parallel_group()  # tensor x pipeline ranks holding one model's parts
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(squares, group=group)
    norm = float(squares.sqrt())
    if max_norm is not None and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for param in params:
            param.grad.detach().mul_(scale)
    return norm


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping (the norm is still reported)
    micro_batch_size: int | None = None  # rows per forward/backward; None: the whole batch at once


@dataclass
class LossConfig:
    pg_clip: float = 0.2
    pg_clip_high: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg_mode: str = "token-mean"
    temperature: float = 1.0  # the sampler's; logprobs are taken from logits / temperature


class Policy:
    """A megatron GPTModel and its AdamW optimizer (None for a frozen reference), with HF weights in and out."""

    def __init__(self, model, hf_dir: str | None, optim: OptimConfig | None, loss: LossConfig | None = None):
        self.model = model
        self.hf_dir = hf_dir  # tokenizer and generation config for save()
        self.loss = loss or LossConfig()
        self.optim = optim
        self.weight_version = 0  # optimizer steps taken
        self.optimizer = None
        if optim is not None:
            self.optimizer = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad],
                lr=optim.lr,
                betas=optim.betas,
                eps=optim.eps,
                weight_decay=optim.weight_decay,
                fused=next(model.parameters()).is_cuda or None,
            )

    @classmethod
    def from_hf(
        cls,
        model_dir: str,
        optim: OptimConfig | None = None,
        loss: LossConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
        seed: int = 1234,
    ) -> Policy:
        """Initializes megatron (once per process), builds the model from model_dir's config and loads its weights."""
        init_megatron(seed=seed)
        model = build_gpt_model(model_dir, dtype=dtype, device=device)
        load_hf_into_megatron(model, model_dir)
        return cls(model, str(model_dir), optim if optim is not None else OptimConfig(), loss)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def frozen_copy(self) -> Policy:
        """A copy of the current weights without an optimizer and without grads: the KL reference."""
        # A new model, not copy.deepcopy: megatron modules hold process groups, which cannot be copied.
        reference = next(self.model.parameters())
        model = build_gpt_model(self.model.hf_config, dtype=reference.dtype, device=reference.device)
        model.load_state_dict(self.model.state_dict(), strict=True)
        model.eval().requires_grad_(False)
        return Policy(model, self.hf_dir, optim=None, loss=self.loss)

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """[B, T] logprobs of batch.input_ids (0 outside real tokens), in micro-batches, without grad.

        Returned on the batch's device (where the batch is assembled), whatever the model's device.
        """
        self.model.eval()
        step = self._micro_batch_size(batch)
        batch_device = batch.input_ids.device
        batch = batch.to(self.device)
        parts = [
            losses.token_logprobs(
                self.model, mb.input_ids, mb.attention_mask, temperature=self.loss.temperature
            ).float()
            for mb in (batch.slice(i, i + step) for i in range(0, len(batch), step))
        ]
        return torch.cat(parts).to(batch_device)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step of the clipped policy-gradient loss (+ KL) over the whole batch."""
        if batch.advantages is None:
            raise ValueError("batch.advantages is None; compute them (e.g. losses.grpo_advantages) before train_step")
        if self.loss.kl_coef and batch.ref_logprobs is None:
            raise ValueError("kl_coef is set but batch.ref_logprobs is None; fill it from the reference policy")

        def micro_loss(mb: TrainBatch, logprobs: torch.Tensor):
            old = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()
            cfg = self.loss
            return losses.policy_loss(
                logprobs,
                old,
                mb.advantages,
                mb.response_mask,
                pg_clip=cfg.pg_clip,
                pg_clip_high=cfg.pg_clip_high,
                ref_logprobs=mb.ref_logprobs,
                kl_coef=cfg.kl_coef,
                kl_estimator=cfg.kl_estimator,
                loss_agg=cfg.loss_agg_mode,
            )

        return self._step(batch, micro_loss, self.loss.loss_agg_mode)

    def sft_step(self, batch: TrainBatch, loss_agg_mode: str = "token-mean") -> dict[str, float]:
        """One optimizer step of teacher-forced cross entropy on the response tokens."""
        return self._step(
            batch, lambda mb, lp: (losses.sft_loss(lp, mb.response_mask, loss_agg_mode), {}), loss_agg_mode
        )

    def _step(self, batch: TrainBatch, micro_loss, loss_agg_mode: str) -> dict[str, float]:
        if self.optimizer is None:
            raise RuntimeError("this Policy is frozen (no optimizer); train the policy it was copied from")
        batch.validate()
        started = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        batch = batch.to(self.device)
        step = self._micro_batch_size(batch)
        total_tokens = batch.response_mask.sum().clamp(min=1)
        totals: dict[str, float] = {}
        for start in range(0, len(batch), step):
            mb = batch.slice(start, start + step)
            logprobs = losses.token_logprobs(
                self.model, mb.input_ids, mb.attention_mask, temperature=self.loss.temperature
            )
            loss, metrics = micro_loss(mb, logprobs)
            # Weight each micro-batch by its share so the sum equals the loss over the whole batch.
            if loss_agg_mode == "token-mean":
                weight = float(mb.response_mask.sum() / total_tokens)
            else:
                weight = len(mb) / len(batch)
            (loss * weight).backward()
            for name, value in {"loss": loss.detach(), **metrics}.items():
                totals[name] = totals.get(name, 0.0) + weight * float(value)
        grad_norm = clip_grad_norm(self.model, self.optim.grad_clip)
        skipped = not math.isfinite(grad_norm)
        if skipped:  # a non-finite gradient would poison the weights: keep the old ones
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.weight_version += 1
        return {
            **totals,
            "grad_norm": grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "response_tokens": float(total_tokens),
            "skipped": float(skipped),
            "weight_version": float(self.weight_version),
            "seconds": time.perf_counter() - started,
        }

    def _micro_batch_size(self, batch: TrainBatch) -> int:
        size = self.optim.micro_batch_size if self.optim is not None else None
        return max(1, min(size or len(batch), len(batch)))

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) in HF layout, including lm_head.weight for tied embeddings (what vLLM loads)."""
        return iter_hf_weights(self.model)

    def save(self, out_dir) -> Path:
        """An HF checkpoint (safetensors, config, tokenizer) of the current weights, loadable by transformers/vLLM."""
        return _save_hf_checkpoint(self.model, self.model.hf_config, self.hf_dir, out_dir)
