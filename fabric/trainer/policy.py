"""`Policy`: a megatron GPTModel plus its optimizer, the unit the RL loop trains, reads logprobs from and syncs.

    policy = Policy.from_hf(model_dir, OptimConfig(lr=1e-5), LossConfig(pg_clip=0.2, kl_coef=0.01))
    reference = policy.frozen_copy()                       # for ref_logprobs
    batch = TrainBatch.from_token_lists(prompt_ids, response_ids, pad_id=tokenizer.pad_token_id)
    batch.old_logprobs = policy.logprobs(batch); batch.ref_logprobs = reference.logprobs(batch)
    batch.advantages = grpo_advantages(rewards, group_size)
    metrics = policy.train_step(batch)
    for name, tensor in policy.hf_weights(): ...          # stream to rollout servers
    policy.save(out_dir)                                  # HF checkpoint for transformers / vLLM

The optimizer is `MainParamsAdamW`: torch's AdamW over fp32 main parameters, with the model's bf16 / fp16 weights
copied from them after every step (what megatron's Float16OptimizerWithFloat16Params does; that one, like the
DistributedOptimizer, insists on CUDA tensors, so it cannot serve on the CPU-only hosts here). Biases and norms get
no weight decay (megatron's rule: 1-D parameters). The learning rate follows megatron's OptimizerParamScheduler
when a schedule is attached (`Policy.set_schedule`).

Across processes (`fabric.trainer.distributed`) every method is collective: every rank calls it with the same whole
batch. Each data-parallel rank takes its share of the rows (`distributed.row_range`), the loss of each share is
aggregated with the whole batch's token and sequence counts, and megatron-core's DistributedDataParallel sums the
gradients over the data-parallel ranks (fp32 gradient buffers); logprobs are gathered back to every rank. The grad
norm is TP-aware, so every rank clips alike and takes the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from fabric.trainer import distributed, losses
from fabric.trainer.compat import init_megatron
from fabric.trainer.model import build_gpt_model, iter_hf_weights, load_hf_into_megatron, token_logprobs
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

    def rows(self, index: torch.Tensor) -> TrainBatch:
        """The rows at `index` (a mini-batch)."""
        return _batch({f.name: _pick(getattr(self, f.name), index) for f in fields(self)})

    def slice(self, start: int, stop: int) -> TrainBatch:
        return _batch({f.name: _rows(getattr(self, f.name), start, stop) for f in fields(self)})

    def narrow(self, length: int) -> TrainBatch:
        """The first `length` columns (a micro-batch trimmed to its longest row); [B] advantages are kept."""
        return _batch(
            {
                f.name: (v if v is None or v.ndim == 1 else v[:, :length])
                for f in fields(self)
                for v in (getattr(self, f.name),)
            }
        )

    def to(self, device) -> TrainBatch:
        return _batch({f.name: (None if (v := getattr(self, f.name)) is None else v.to(device)) for f in fields(self)})


def _batch(columns: dict[str, Any]) -> TrainBatch:
    """A TrainBatch from its fields by name, each mapped from a batch's (so None exactly where that one had None)."""
    return TrainBatch(**columns)


def _pick(value: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if value is None else value[index]


def _rows(value: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if value is None else value[start:stop]


def clip_grad_norm(model_or_params, max_norm: float | None) -> float:
    """The global L2 norm of the gradients over all tensor-parallel ranks; scales them down to max_norm if above.

    Like torch's clip_grad_norm_, but each TP-sharded gradient counts once per shard and each replicated one
    (norms, biases of row-parallel layers) once in all, so every TP rank computes the same norm and clips alike.
    (megatron's own clip_grads asserts CUDA tensors, so it cannot serve on CPU.) Takes a model or its parameters
    (main parameters carry the model parameters' TP attributes).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    counted = [p.grad.detach() for p in params if param_is_not_tensor_parallel_duplicate(p)]
    norms = torch._foreach_norm(counted, 2, dtype=torch.float32) if counted else []  # fused, not one per tensor
    squares = torch.stack(list(norms)).square().sum() if norms else torch.zeros(())
    squares = squares.to(params[0].grad.device)
    group = parallel_state.get_model_parallel_group()  # tensor x pipeline ranks holding one model's parts
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(squares, group=group)
    norm = float(squares.sqrt())
    if max_norm is not None and math.isfinite(norm) and norm > max_norm:
        torch._foreach_mul_([p.grad.detach() for p in params], max_norm / (norm + 1e-6))
    return norm


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0  # not on biases and norms (1-D parameters), as megatron
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping (the norm is still reported)
    micro_batch_size: int | None = None  # rows per forward/backward; None: the whole batch at once
    # ROLL's use_dynamic_batching_in_train / max_tokens_per_microbatch_in_train / sequence_length_round_in_train:
    # rows sorted by length, micro-batches of at most max_tokens_per_microbatch tokens counted as rows x longest row
    # rounded up to sequence_length_round, instead of micro_batch_size rows
    use_dynamic_batching: bool = False
    max_tokens_per_microbatch: int | None = None
    sequence_length_round: int = 128


@dataclass
class LossConfig:
    pg_clip: float = 0.2  # ROLL's pg_clip, or pg_clip_low with use_pg_clip_range
    pg_clip_high: float | None = None  # None: pg_clip
    dual_clip: float | None = None  # the dual-clip bound c (ROLL's dual_clip_loss: 1 + 2 pg_clip); None: off
    kl_coef: float = 0.0  # ROLL's use_kl_loss x kl_loss_coef
    kl_estimator: str = "k3"
    loss_agg_mode: str = "seq-mean-token-mean"
    norm_length: float | None = None  # seq-mean-token-sum-norm's constant divisor (ROLL's: sequence_length - 1)
    temperature: float = 1.0  # the sampler's; logprobs are taken from logits / temperature


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """megatron's rule (_get_param_groups): biases and 1-D parameters (norms) are not decayed."""
    return name.endswith(".bias") or param.ndim == 1


class MainParamsAdamW:
    """AdamW on fp32 main parameters for a model of any dtype (megatron's Float16OptimizerWithFloat16Params on one
    data-parallel rank): the model's gradients are copied to fp32 main gradients, clipped by the TP-aware global
    norm, AdamW updates the main parameters, and the model's weights are copied back from them (rounded to the
    model's dtype). An fp32 model is its own main copy. Two param groups: decayed, and not (wd_mult 0)."""

    def __init__(self, model: torch.nn.Module, optim: OptimConfig):
        from megatron.core.tensor_parallel import copy_tensor_model_parallel_attributes

        self.optim = optim
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.model_params = [p for _, p in named]
        self.main_params = []
        for param in self.model_params:
            if param.dtype == torch.float32:
                self.main_params.append(param)
            else:
                main = torch.nn.Parameter(param.detach().clone().float())
                copy_tensor_model_parallel_attributes(main, param)
                self.main_params.append(main)
        decay: list[torch.nn.Parameter] = []
        plain: list[torch.nn.Parameter] = []
        for (name, param), main in zip(named, self.main_params, strict=True):
            (plain if no_weight_decay(name, param) else decay).append(main)
        groups = [
            {"params": decay, "wd_mult": 1.0, "weight_decay": optim.weight_decay},
            {"params": plain, "wd_mult": 0.0, "weight_decay": 0.0},
        ]
        self.adamw = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            fused=self.model_params[0].is_cuda or None,
        )

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups

    @property
    def state(self):
        return self.adamw.state

    def zero_grad(self) -> None:
        """Drops the model's gradients; a separate fp32 main copy keeps its gradient buffer, which the next step
        overwrites (or drops, for a parameter that got no gradient)."""
        for param, main in zip(self.model_params, self.main_params, strict=True):
            param.grad = None
            if main is param:
                main.grad = None

    def step(self) -> tuple[float, bool]:
        """Clips and applies the model's gradients. Returns (grad norm before clipping, skipped: not finite).

        Under megatron's DDP the gradients are its reduced fp32 buffers (`param.main_grad`), used in place."""
        copies: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # (fp32 main grads, model grads)
        for param, main in zip(self.model_params, self.main_params, strict=True):
            reduced = getattr(param, "main_grad", None)
            if reduced is not None:
                main.grad = reduced if reduced.dtype == torch.float32 else reduced.float()
            elif main is not param:
                if param.grad is None:
                    main.grad = None
                    continue
                if main.grad is None:  # kept from step to step: one fused copy per step, no new allocation
                    main.grad = torch.empty_like(main)
                copies[0].append(main.grad)
                copies[1].append(param.grad.detach())
        if copies[0]:
            torch._foreach_copy_(*copies)
        grad_norm = clip_grad_norm(self.main_params, self.optim.grad_clip)
        if not math.isfinite(grad_norm):  # a non-finite gradient would poison the weights: keep the old ones
            self.zero_grad()
            return grad_norm, True
        self.adamw.step()
        with torch.no_grad():
            pairs = [(p, m) for p, m in zip(self.model_params, self.main_params, strict=True) if m is not p]
            if pairs:
                torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])
        return grad_norm, False


class Policy:
    """A megatron GPTModel and its AdamW optimizer (None for a frozen reference), with HF weights in and out."""

    def __init__(self, model, hf_dir: str | None, optim: OptimConfig | None, loss: LossConfig | None = None):
        self.model = model
        self.hf_dir = hf_dir  # tokenizer and generation config for save()
        self.loss = loss or LossConfig()
        self.optim = optim
        self.weight_version = 0  # optimizer steps taken
        self.optimizer: MainParamsAdamW | None = None
        self.scheduler = None  # megatron's OptimizerParamScheduler, stepped after every RL optimizer step
        self._schedule = None
        self.ddp = None  # megatron's DistributedDataParallel over the model, with more than one data-parallel rank
        self.checkpoint_sharded = False  # save() also writes megatron's sharded state (under out_dir/megatron)
        # Micro-batches as packed sequences (no compute on padding), where the core attention can: SDPA's, on the
        # CPU. Not on CUDA: the packed path runs one SDPA per sequence and megatron's thd RoPE reads cu_seqlens on the
        # host in every layer, so on an H200 (1.5B layout, 16 rows of 1,024 at about half padding) a packed step took
        # 0.57 s against 0.34 s padded with compiled layers (0.79x against 1.08x of transformers eager). Not with
        # compiled layers either: packed micro-batches run them eager (model.compile_layers).
        sdpa = getattr(model, "attention_backend", None) == "sdpa"
        on_cuda = any(p.is_cuda for p in model.parameters())
        self.packed = sdpa and not on_cuda and not getattr(model, "compiled_layers", False)
        if optim is not None and optim.use_dynamic_batching and not optim.max_tokens_per_microbatch:
            raise ValueError("use_dynamic_batching needs max_tokens_per_microbatch (the token budget of a micro-batch)")
        if optim is not None:
            if distributed.data_parallel()[1] > 1:
                self.ddp = _wrap_ddp(model)
            self.optimizer = MainParamsAdamW(model, optim)

    def reset_optimizer(self) -> None:
        """A fresh optimizer (no moments; fp32 main params copied from the current weights), e.g. after the
        supervised warm-up, whose AdamW state must not carry into RL. A schedule attached is re-attached."""
        if self.optimizer is None or self.optim is None:
            raise RuntimeError("this Policy is frozen (no optimizer)")
        self.optimizer = MainParamsAdamW(self.model, self.optim)
        if self.scheduler is not None:
            self.set_schedule(self._schedule)

    def set_schedule(self, schedule) -> None:
        """schedule(optimizer) -> a scheduler with step(increment) setting each param group's lr (megatron's
        OptimizerParamScheduler: `fabric.trainer.algorithm.lr_scheduler`); it takes effect at once."""
        self._schedule = schedule
        self.scheduler = schedule(self.optimizer)

    @classmethod
    def from_hf(
        cls,
        model_dir: str,
        optim: OptimConfig | None = None,
        loss: LossConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
        seed: int = 1234,
        attention: str = "sdpa",
        recompute_granularity: str | None = None,
        recompute_method: str | None = None,
        recompute_num_layers: int | None = None,
    ) -> Policy:
        """Initializes megatron (once per process), builds the model from model_dir's config and loads its weights.

        attention and recompute_*: see `fabric.trainer.model.build_gpt_model`."""
        init_megatron(seed=seed)
        model = build_gpt_model(
            model_dir, dtype, device, attention, recompute_granularity, recompute_method, recompute_num_layers
        )
        load_hf_into_megatron(model, model_dir)
        return cls(model, str(model_dir), optim if optim is not None else OptimConfig(), loss)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def frozen_copy(self) -> Policy:
        """A copy of the current weights without an optimizer and without grads: the KL reference."""
        # A new model, not copy.deepcopy: megatron modules hold process groups, which cannot be copied.
        reference = next(self.model.parameters())
        model = build_gpt_model(
            self.model.hf_config, reference.dtype, reference.device, getattr(self.model, "attention_backend", "sdpa")
        )
        model.load_state_dict(self.model.state_dict(), strict=True)
        model.eval().requires_grad_(False)
        return Policy(model, self.hf_dir, optim=None, loss=self.loss)

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """[B, T] logprobs of batch.input_ids (0 outside real tokens), in micro-batches, without grad.

        Returned on the batch's device (where the batch is assembled), whatever the model's device. With several
        data-parallel ranks each computes its rows and all get the whole result.
        """
        self.model.eval()
        rows = len(batch)
        batch_device = batch.input_ids.device
        batch = batch.to(self.device)
        start, stop = distributed.row_range(rows)
        mine = batch.slice(start, stop)
        local = torch.zeros(mine.input_ids.shape, device=self.device)
        for index, mb, padded in self._micro_batches(mine):
            logprobs = token_logprobs(
                self.model, mb.input_ids, mb.attention_mask, self.loss.temperature, packed=self.packed and padded
            )
            local[index, : mb.input_ids.shape[1]] = logprobs.float()
        return distributed.gather_rows(local, rows).to(batch_device)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step of the clipped policy-gradient loss (+ KL) over the whole batch (a mini-batch), in
        micro-batches of optim.micro_batch_size whose gradients add up to the whole batch's (gradient accumulation:
        each micro-batch's loss is aggregated with the whole batch's token and sequence counts)."""
        if batch.advantages is None:
            raise ValueError("batch.advantages is None; compute them (e.g. losses.grpo_advantages) before train_step")
        if self.loss.kl_coef and batch.ref_logprobs is None:
            raise ValueError("kl_coef is set but batch.ref_logprobs is None; fill it from the reference policy")
        cfg = self.loss

        def micro_loss(mb: TrainBatch, logprobs: torch.Tensor, counts: dict):
            old = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()
            assert mb.advantages is not None  # checked on the whole batch above
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
                dual_clip=cfg.dual_clip,
                norm_length=cfg.norm_length,
                **counts,
            )

        metrics = self._step(batch, micro_loss, cfg.temperature)
        if self.scheduler is not None:
            self.scheduler.step(1)
        return metrics

    def sft_step(self, batch: TrainBatch, loss_agg_mode: str = "token-mean") -> dict[str, float]:
        """One optimizer step of teacher-forced cross entropy on the response tokens, at temperature 1 (the data's
        distribution, not the sampler's)."""
        return self._step(
            batch,
            lambda mb, lp, counts: (losses.sft_loss(lp, mb.response_mask, loss_agg_mode, **counts), {}),
            temperature=1.0,
        )

    def _step(self, batch: TrainBatch, micro_loss, temperature: float) -> dict[str, float]:
        if self.optimizer is None:
            raise RuntimeError("this Policy is frozen (no optimizer); train the policy it was copied from")
        batch.validate()
        dp = distributed.data_parallel()[1]
        if len(batch) < dp:
            raise ValueError(f"a batch of {len(batch)} rows cannot feed {dp} data-parallel ranks; give >= {dp}")
        started = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad()
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()
        rows = distributed.row_range(len(batch))
        lengths = batch.attention_mask[rows[0] : rows[1]].sum(-1).tolist()  # where the batch arrives (the host)
        batch = batch.to(self.device)
        mask = batch.response_mask  # the counts are the whole batch's, whichever rows this rank takes
        counts = {"num_tokens": mask.sum().float(), "num_seqs": (mask.sum(-1) > 0).sum().float()}
        batch = batch.slice(*rows)
        sums: dict[str, torch.Tensor] = {}  # on the device: no host sync between micro-batches
        for _, mb, padded in self._micro_batches(batch, lengths):
            # validated above (right padding): no check per micro-batch, which would wait for the device
            packed = self.packed and padded
            logprobs = token_logprobs(self.model, mb.input_ids, mb.attention_mask, temperature, packed, check=False)
            loss, metrics = micro_loss(mb, logprobs, counts)
            loss.backward()  # each micro-batch's share: the sum over micro-batches and ranks is the whole batch's
            for name, value in {"loss": loss.detach(), **metrics}.items():
                sums[name] = sums[name] + value if name in sums else value
        totals = {name: float(value) for name, value in sums.items()}
        if self.ddp is not None:
            self.ddp.finish_grad_sync()  # the sum over data-parallel ranks (calculate_per_token_loss: no 1/dp)
            totals = distributed.sum_over_data_parallel(totals, self.device)
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm, skipped = self.optimizer.step()
        if not skipped:
            self.weight_version += 1
        return {
            **totals,
            "grad_norm": grad_norm,
            "lr": lr,
            "response_tokens": float(counts["num_tokens"]),
            "skipped": float(skipped),
            "weight_version": float(self.weight_version),
            "seconds": time.perf_counter() - started,
        }

    def _micro_batches(
        self, batch: TrainBatch, lengths: list[int] | None = None
    ) -> list[tuple[torch.Tensor, TrainBatch, bool]]:
        """(row indices, micro-batch trimmed to its longest row, whether it has padding) covering the batch's rows
        once; all made before the first forward pass, from the rows' lengths (given, or read from the batch).

        A micro-batch with padding is packed (`self.packed`); one without is faster as it is (one batched causal
        attention). micro_batch_size rows at a time; with use_dynamic_batching ROLL's rule (dynamic_batching_shard):
        rows sorted by length, each micro-batch as many as fit max_tokens_per_microbatch counted as rows x longest
        row."""
        optim = self.optim
        if lengths is None:
            lengths = batch.attention_mask.sum(-1).tolist()
        if optim is not None and optim.use_dynamic_batching:
            budget = int(optim.max_tokens_per_microbatch or 0)
            step = max(1, optim.sequence_length_round)
            padded = [-(-n // step) * step for n in lengths]
            if max(padded, default=0) > budget:
                raise ValueError(
                    f"a sequence of {max(lengths)} tokens ({max(padded)} rounded up to sequence_length_round_in_train="
                    f"{step}) exceeds max_tokens_per_microbatch_in_train={budget}; raise it to at least that"
                )
            groups: list[list[int]] = []
            for row in sorted(range(len(lengths)), key=lambda r: lengths[r]):
                if groups and (len(groups[-1]) + 1) * padded[row] <= budget:  # sorted: this row is the longest
                    groups[-1].append(row)
                else:
                    groups.append([row])
        else:
            size = max(1, min((optim.micro_batch_size if optim else None) or len(batch), len(batch)))
            groups = [list(range(start, min(start + size, len(batch)))) for start in range(0, len(batch), size)]
        out = []
        for group in groups:
            index = torch.tensor(group, device=batch.input_ids.device)
            longest, shortest = max(lengths[r] for r in group), min(lengths[r] for r in group)
            out.append((index, batch.rows(index).narrow(longest), shortest < longest))
        return out

    def set_lr(self, lr: float) -> None:
        if self.optimizer is None:
            raise RuntimeError("this Policy is frozen (no optimizer)")
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) in HF layout, including lm_head.weight for tied embeddings (what vLLM loads).

        Collective over the tensor-parallel ranks of data-parallel replica 0 (each tensor all-gathered as it is
        reached); the other replicas yield nothing."""
        if not distributed.in_first_replica():
            return iter(())
        return iter_hf_weights(self.model)

    def save(self, out_dir) -> Path:
        """An HF checkpoint (safetensors, config, tokenizer) of the current weights, loadable by transformers/vLLM.

        Collective: replica 0's TP ranks gather each tensor, rank 0 writes (in shards, never the whole model at once).
        With `checkpoint_sharded`, megatron's sharded state goes to out_dir/megatron too (`fabric train --resume`).
        """
        if self.checkpoint_sharded:
            self.save_distributed(Path(out_dir) / "megatron")
        if not distributed.in_first_replica():
            return Path(out_dir)
        return _save_hf_checkpoint(self.model, self.model.hf_config, self.hf_dir, out_dir)

    # ---- sharded state: resume at the same parallel sizes ---------------------------------------------------------

    def save_distributed(self, out_dir) -> Path:
        """Each rank's shard of the model (megatron's TP-local state dict) with its optimizer and scheduler state and
        the weight version, one file per rank (`rank00000.pt`, ...). Collective (barriers around the writes).

        Resumable at the same tensor-parallel size and world (`load_distributed`). megatron's dist_checkpointing
        (resharding on load) hung on CPU over gloo here and is not used yet."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {"weight_version": self.weight_version, "model": self.model.state_dict(), "world": distributed.world()}
        if self.optimizer is not None:
            state["main_params"] = [p.detach().cpu() for p in self.optimizer.main_params]
            state["optimizer"] = self.optimizer.adamw.state_dict()
            state["scheduler"] = None if self.scheduler is None else self.scheduler.state_dict()
        torch.save(state, out_dir / f"rank{distributed.world()[0]:05d}.pt")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return out_dir

    def load_distributed(self, in_dir) -> None:
        """Restores what save_distributed wrote (same tensor-parallel size and world)."""
        saved = torch.load(Path(in_dir) / f"rank{distributed.world()[0]:05d}.pt", weights_only=False)
        if tuple(saved["world"])[1] != distributed.world()[1]:
            raise ValueError(
                f"{in_dir} was saved by a world of {saved['world'][1]}; this one is {distributed.world()[1]}"
            )
        self.model.load_state_dict(saved["model"], strict=True)
        self.weight_version = int(saved["weight_version"])
        if self.optimizer is not None and "optimizer" in saved:
            with torch.no_grad():
                for main, value in zip(self.optimizer.main_params, saved["main_params"], strict=True):
                    main.copy_(value)
                for param, main in zip(self.optimizer.model_params, self.optimizer.main_params, strict=True):
                    if param is not main:
                        param.copy_(main)
            self.optimizer.adamw.load_state_dict(saved["optimizer"])
            if self.scheduler is not None and saved.get("scheduler") is not None:
                self.scheduler.load_state_dict(saved["scheduler"])


def _wrap_ddp(model):
    """megatron-core's DistributedDataParallel: fp32 gradient buffers all-reduced over the data-parallel group after
    the backward passes (finish_grad_sync), summed, not averaged (each rank's loss already carries the whole batch's
    counts: calculate_per_token_loss)."""
    import copy

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = copy.copy(model.config)
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    ddp.broadcast_params()  # every replica starts from rank 0's weights
    return ddp
