"""`fabric train --config FILE`: the trainer's composition root. Loads the tokenizer, dataset and policy (and runs the
supervised warm-up, if configured), builds the Trainer and serves fabric.v1.TrainerService while it runs.

Under torchrun (`fabric train --nproc-per-node N`, or `torchrun ... -m fabric.trainer`) every rank does the setup
(its shard of the policy, the warm-up, the reference); rank 0 then runs the Trainer and the TrainerService and the
others follow its calls (fabric/trainer/distributed.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import torch

from fabric import security
from fabric.config import ConfigError, load_config
from fabric.config.sampling import sampling_settings
from fabric.trainer import distributed, report
from fabric.trainer.config import PipelineConfig, pipeline_config
from fabric.trainer.data import load_dataset
from fabric.trainer.loop import Trainer
from fabric.v1 import trainer_pb2

log = logging.getLogger(__name__)


def check_addresses(pc: PipelineConfig) -> None:
    if not pc.rollout_addresses:
        raise ConfigError("cluster.rollout", "no rollout server addresses (fabric run fills them in)")
    if not pc.reward_addresses:
        raise ConfigError("cluster.reward", "no reward server addresses (fabric run fills them in)")


async def addresses_from_file(path: Path, timeout: float) -> tuple[list[str], list[str]]:
    """The rollout and reward addresses `fabric run` writes to `path` ({"rollout": [...], "reward": [...]}) once
    its servers are ready: the trainer loads its policy meanwhile. Gives up when the process that started this one
    is gone (nobody will write it) or after `timeout` seconds."""
    parent = os.getppid()
    deadline = time.monotonic() + timeout
    while not path.exists():
        if os.getppid() != parent:
            raise RuntimeError(f"the process that started this trainer is gone: nobody will write {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no server addresses in {path} after {timeout:.0f} s (did the servers start?)")
        await asyncio.sleep(0.1)
    servers = json.loads(path.read_text())
    return [str(a) for a in servers["rollout"]], [str(a) for a in servers["reward"]]


async def train_main(
    pc: PipelineConfig,
    ready=print,
    parallel: distributed.ParallelConfig | None = None,
    resume: str | None = None,
    servers_file: Path | None = None,
) -> Trainer | None:
    """Runs the trainer; returns the Trainer on rank 0 and None on the other ranks. With `servers_file` the servers'
    addresses come from that file, waited for after the policy is loaded (fabric run starts the servers meanwhile)."""
    from transformers import AutoTokenizer

    from fabric.trainer.algorithm import lr_scheduler

    if servers_file is None:
        check_addresses(pc)
    if not Path(pc.pretrain, "config.json").is_file():
        raise ConfigError("actor_train.pretrain", f"not an HF model directory (no config.json): {pc.pretrain}")
    tokenizer = AutoTokenizer.from_pretrained(pc.pretrain)
    dataset = load_dataset(pc.dataset, tokenizer, pc.prompt_length)
    distributed.init(parallel or distributed.ParallelConfig(), pc.seed)  # every rank: torch.distributed + megatron
    control = distributed.Control()
    pc.algorithm = distributed.data_parallel_algorithm(pc.algorithm, pc.rollout_batch_size * pc.group_size)
    torch.manual_seed(pc.seed)
    policy = await asyncio.to_thread(build_policy, pc)
    policy.checkpoint_sharded = distributed.world()[1] > 1  # checkpoints carry megatron's sharded state too
    if pc.sft_steps and not resume:
        await asyncio.to_thread(sft_warmup_from_dataset, policy, dataset, pc)
        policy.reset_optimizer()  # RL starts with fresh AdamW moments, not the warm-up's
    a = pc.algorithm
    total = a.optimizer_steps(pc.rollout_batch_size * pc.group_size, pc.max_steps)
    policy.set_schedule(lambda optimizer: lr_scheduler(optimizer, a, total))
    if resume:
        await asyncio.to_thread(policy.load_distributed, resume)
        log.info("resumed the policy (weights, optimizer, schedule) from %s", resume)
    reference = policy.frozen_copy()
    if not distributed.is_leader():  # a follower: make rank 0's calls until it is done
        await asyncio.to_thread(distributed.follow, {"policy": policy, "reference": reference}, control)
        return None
    if servers_file is not None:
        log.info("policy loaded; waiting for the servers' addresses in %s", servers_file)
        # a self-judging run starts its reward servers after its rollout servers: two start timeouts at most
        pc.rollout_addresses, pc.reward_addresses = await addresses_from_file(
            servers_file, 2 * pc.server_start_timeout_s
        )
        check_addresses(pc)
    with distributed.leading({"policy": policy, "reference": reference}, control) as views:
        return await _serve(pc, views["policy"], views["reference"], tokenizer, dataset, ready)


async def _serve(pc: PipelineConfig, policy, reference, tokenizer, dataset, ready) -> Trainer:
    from fabric.server import FabricServer
    from fabric.trainer.servicer import TrainerServicer
    from fabric.v1 import trainer_pb2_grpc

    trainer = Trainer(pc, policy, reference, tokenizer, dataset)
    servicer = TrainerServicer(trainer)
    server = FabricServer(
        ["fabric.v1.TrainerService"],
        lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, s),
        host=pc.host,
        port=pc.trainer_port,
    )
    await server.start()
    ready(f"fabric trainer server listening on {server.address}")
    try:
        await trainer.run(pc.rollout_addresses, pc.reward_addresses)
    finally:
        await server.stop(grace=2)
    return trainer


def optim_config(pc: PipelineConfig):
    """actor_train.training_args as the policy's optimizer settings (per_device_train_batch_size: the micro-batch)."""
    from fabric.trainer.policy import OptimConfig

    a = pc.algorithm
    return OptimConfig(
        lr=a.learning_rate,
        weight_decay=a.weight_decay,
        betas=(a.adam_beta1, a.adam_beta2),
        grad_clip=a.max_grad_norm,
        micro_batch_size=a.per_device_train_batch_size,
        use_dynamic_batching=pc.use_dynamic_batching_in_train,
        max_tokens_per_microbatch=pc.max_tokens_per_microbatch_in_train or None,
        sequence_length_round=pc.sequence_length_round_in_train,
    )


def loss_config(pc: PipelineConfig):
    """The loss as ROLL's keys say: clip range (use_pg_clip_range), dual clip (1 + 2 pg_clip), the KL loss only with
    use_kl_loss (kl_loss_coef x k3; init_kl_coef is the in-reward KL's, see algorithm.py), the aggregation."""
    from fabric.trainer.policy import LossConfig

    a = pc.algorithm
    return LossConfig(
        pg_clip=a.clip_low,
        pg_clip_high=a.clip_high,
        dual_clip=1.0 + 2.0 * a.pg_clip if a.dual_clip_loss else None,
        kl_coef=a.kl_loss_coef_in_use,
        kl_estimator="k3",
        loss_agg_mode=a.loss_agg_mode,
        norm_length=float(pc.sequence_length - 1),  # ROLL's divisor: its loss mask's padded width
        temperature=float(sampling_settings(pc.sampling)["temperature"]) or 1.0,
    )


def build_policy(pc: PipelineConfig):
    from fabric.trainer.policy import Policy

    return Policy.from_hf(
        pc.pretrain,
        optim_config(pc),
        loss_config(pc),
        getattr(torch, pc.dtype),
        None,
        pc.seed,
        recompute_granularity=pc.recompute_granularity,
        recompute_method=pc.recompute_method,
        recompute_num_layers=pc.recompute_num_layers,
    )


def sft_warmup_from_dataset(policy, dataset: list[dict], pc: PipelineConfig) -> None:
    from fabric.trainer.sft import sft_warmup

    pairs = [(row["prompt"], row["response"]) for row in dataset if row.get("response")]
    if not pairs:
        raise ConfigError("sft_warmup.steps", "the dataset has no `response` column to warm up on")
    log.info("supervised warm-up: %d steps on %d pairs", pc.sft_steps, len(pairs))
    sft_warmup(policy, pairs, pc.sft_steps, batch_size=pc.sft_batch_size, lr=pc.sft_learning_rate, seed=pc.seed)


def cli_main(args) -> int:
    import os
    import sys

    cfg = load_config(args.config, args.overrides, search_paths=args.config_search_path)
    pc = pipeline_config(cfg)
    parallel = distributed.parallel_config(cfg)
    nproc = getattr(args, "nproc_per_node", None) or 1
    if nproc > 1 and not distributed.launched():  # one node: torchrun starts the ranks, each `-m fabric.trainer`
        command = distributed.torchrun_command(nproc, distributed.strip_nproc(list(args.argv)))
        sys.stdout.flush()
        os.execv(command[0], command)
    parallel.data(nproc if not distributed.launched() else distributed.env_world()[1])
    if distributed.env_world()[0] != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story
    security.configure(security.SecurityConfig.from_cfg(cfg))
    for key in ("rollout", "reward"):
        given = getattr(args, key, None)
        if given:
            setattr(pc, f"{key}_addresses", list(given))
    if getattr(args, "port", None) is not None:
        pc.trainer_port = args.port
    try:
        trainer = asyncio.run(
            train_main(
                pc,
                ready=lambda line: print(line, flush=True),
                parallel=parallel,
                resume=getattr(args, "resume", None),
                servers_file=Path(args.servers_file) if getattr(args, "servers_file", None) else None,
            )
        )
    except KeyboardInterrupt:
        return 130
    if trainer is None:  # a follower rank
        return 0
    from rich.console import Console

    console = Console()
    console.print(report.summary_table(trainer.history))
    first, last = report.first_last(trainer.history)
    console.print(f"reward: first 5 steps {first:.3f} -> last 5 steps {last:.3f}; metrics in {trainer.metrics_path}")
    return 0 if trainer.state == trainer_pb2.TRAINER_STATE_FINISHED else 1
