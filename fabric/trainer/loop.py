"""The GRPO loop, trainer-driven: `fabric train --config FILE`.

One step:
    prompts --Generate--> rollout servers (RolloutPool: least-loaded, failover)  -> samples with weight_version
    samples --Score-----> reward servers (RewardPool: retries elsewhere)          -> rewards
    advantages as ROLL's keys say (algorithm.py: grpo / reinforce, masks, clips, whitening, in-reward KL)
    -> mini-batches: clipped policy loss (+ ROLL's KL loss) -> AdamW steps on fp32 main params, LR schedule
    policy weights --UpdateWeights (relay chain)--> every live rollout server      -> version + 1
Samples produced by a version other than the one current at the step ("stale": e.g. from a server that missed an
update) are counted and, by default, left out of the loss and of their group's statistics (`stale_samples: drop`);
`use` keeps them, unweighted. An empty response (EOS at once) is never sent to the reward servers (they refuse it)
and scores each reward's lowest score of the step, or 0 if that is lower: it never beats a wrong answer.
The rollout servers may start with `load_format: dummy`: the first push (version 1) happens before any rollout.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fabric.config.pipeline import PipelineConfig
from fabric.errors import precondition
from fabric.routing import RewardPool, RolloutPool
from fabric.trainer import report
from fabric.trainer.algorithm import KLController
from fabric.v1 import rollout_pb2, trainer_pb2

log = logging.getLogger(__name__)

FINAL_STATES = (trainer_pb2.TRAINER_STATE_FINISHED, trainer_pb2.TRAINER_STATE_FAILED)
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1}  # what the trainer's logprobs assume


def sampling_settings(generating: dict) -> dict:
    """The config's sampling settings with the ones the trainer's logprobs depend on made explicit, so that every
    request carries them and no server default can differ from what the trainer computes with."""
    return {**SAMPLING_DEFAULTS, **generating}


@dataclass
class Sample:
    prompt_index: int
    response: rollout_pb2.GenerateResponse
    reward: float = 0.0


class Trainer:
    """Owns the policy and the pools; `run()` drives the steps, the TrainerService reads and steers it."""

    def __init__(self, pc: PipelineConfig, policy, reference, tokenizer, dataset: list[dict]):
        self.pc = pc
        self.policy = policy
        self.reference = reference
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.rng = random.Random(pc.seed)
        self.order: list[int] = []
        self.state = trainer_pb2.TRAINER_STATE_STARTING
        self.message = ""
        self.step = 0
        self.version = 0
        self.history: list[dict] = []
        self.subscribers: set[asyncio.Queue] = set()
        self.resume_event = asyncio.Event()
        self.resume_event.set()
        self.stop_requested = False
        self.save_on_stop = False
        self.lock = asyncio.Lock()  # held while the weights change: a checkpoint waits for a whole step
        self.rollouts: RolloutPool | None = None
        self.rewards: RewardPool | None = None
        self.metrics_path = pc.out / "metrics.jsonl"
        self.serving_dtype = None
        a = pc.algorithm
        self.kl_ctrl = KLController(a.init_kl_coef, a.target_kl, a.kl_horizon)
        self.sampling = sampling_settings(pc.sampling)

    # ---- control (the TrainerService calls these) --------------------------------------------------------------

    def pause(self) -> int:
        """Holds the loop before its next step (the current one finishes). Returns the state."""
        if self.state in FINAL_STATES:
            raise precondition("the run has ended; nothing to pause", "RUN_ENDED")
        self.resume_event.clear()
        if self.state == trainer_pb2.TRAINER_STATE_RUNNING:
            self.state = trainer_pb2.TRAINER_STATE_PAUSED
        return self.state

    def resume(self) -> int:
        if self.state in FINAL_STATES:
            raise precondition("the run has ended; nothing to resume", "RUN_ENDED")
        if self.state == trainer_pb2.TRAINER_STATE_PAUSED:
            self.state = trainer_pb2.TRAINER_STATE_RUNNING
        self.resume_event.set()
        return self.state

    def stop(self) -> int:
        """Ends the run after the current step (with the final checkpoint). Returns the state."""
        self.stop_requested = True
        self.resume_event.set()
        if self.state not in FINAL_STATES:
            self.state = trainer_pb2.TRAINER_STATE_STOPPING
        return self.state

    # ---- the loop ----------------------------------------------------------------------------------------------

    async def run(self, rollout_addresses: list[str], reward_addresses: list[str]) -> None:
        self.rollouts = RolloutPool(rollout_addresses, stream_timeout=self.pc.generate_timeout_s)
        self.rewards = RewardPool(reward_addresses, timeout=self.pc.score_timeout_s)
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self.metrics_path.write_text("")
        try:
            sync_seconds = await self.push_weights()  # version 1: the servers may hold dummy weights
            log.info("initial weights pushed as version %d in %.2f s", self.version, sync_seconds)
            self.state = trainer_pb2.TRAINER_STATE_RUNNING
            while self.step < self.pc.max_steps and not self.stop_requested:
                await self.resume_event.wait()
                if self.stop_requested:
                    break
                async with self.lock:
                    metrics = await self.run_step(self.step + 1)
                self.step += 1
                self.record(metrics)
                if self.pc.save_steps and self.step % self.pc.save_steps == 0:
                    await self.save_checkpoint(self.pc.out / "checkpoints" / f"step_{self.step}")
            self.state = trainer_pb2.TRAINER_STATE_STOPPING
            await self.save_checkpoint(self.pc.out / "checkpoints" / "final")
            self.state = trainer_pb2.TRAINER_STATE_FINISHED
        except Exception as exc:
            self.state = trainer_pb2.TRAINER_STATE_FAILED
            self.message = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            report.write_plot(self.history, self.pc.out / "metrics.png")
            for queue in self.subscribers:
                queue.put_nowait(None)
            await self.rollouts.close()
            await self.rewards.close()

    def next_prompts(self) -> list[int]:
        picked = []
        while len(picked) < self.pc.rollout_batch_size:
            if not self.order:
                self.order = list(range(len(self.dataset)))
                self.rng.shuffle(self.order)
            picked.append(self.order.pop())
        return picked

    async def run_step(self, step: int) -> dict:
        t_start = time.perf_counter()
        await self.readmit_servers()
        prompts = self.next_prompts()
        sampling = rollout_pb2.SamplingParams(**self.sampling, logprobs=True)
        requests = [
            rollout_pb2.GenerateRequest(request_id=f"s{step}-p{k}", prompt=self.dataset[i]["prompt"], sampling=sampling)
            for k, i in enumerate(prompts)
        ]
        samples: dict[tuple[int, int], Sample] = {}
        async for response in self.rollouts.generate(requests):
            if response.HasField("error"):
                raise RuntimeError(f"rollout refused {response.request_id}: {response.error.message}")
            k = int(response.request_id.rsplit("-p", 1)[1])
            samples[(k, response.sample_index)] = Sample(prompts[k], response)
        t_generated = time.perf_counter()
        ordered = [samples[(k, j)] for k in range(len(prompts)) for j in range(self.pc.group_size)]
        await self.score(ordered, step)
        t_scored = time.perf_counter()
        metrics = await asyncio.to_thread(self.train, ordered)
        t_trained = time.perf_counter()
        sync_seconds = await self.push_weights()
        t_end = time.perf_counter()
        generated = sum(len(s.response.token_ids) for s in ordered)
        metrics.update(
            step=step,
            weight_version=self.version,
            generate_seconds=t_generated - t_start,
            reward_seconds=t_scored - t_generated,
            train_seconds=t_trained - t_scored,
            weight_sync_seconds=sync_seconds,
            step_seconds=t_end - t_start,
            tokens_per_second=generated / max(t_generated - t_start, 1e-9),
            samples=len(ordered),
            response_length_mean=generated / len(ordered),
        )
        metrics["extra"]["rollout_servers_alive"] = float(len(self.rollouts.alive))
        return metrics

    async def score(self, samples: list[Sample], step: int) -> None:
        items, owners, empty = [], [], []
        for n, sample in enumerate(samples):
            row = self.dataset[sample.prompt_index]
            names = [
                name for name, spec in self.pc.rewards.items() if not spec["tags"] or row.get("tag") in spec["tags"]
            ]
            if not sample.response.text.strip():
                empty.append((sample, names))  # reward servers refuse empty responses: scored below
                continue
            for name in names:
                items.append(
                    dict(
                        request_id=f"s{step}-{n}-{name}",
                        prompt=row["prompt"],
                        response=sample.response.text,
                        ground_truth=str(row["ground_truth"]),
                        reward_name=name,
                        response_token_ids=list(sample.response.token_ids),
                    )
                )
                owners.append((sample, name))
        responses = await self.rewards.score(items) if items else []
        lowest: dict[str, float] = {}
        for (sample, name), response in zip(owners, responses, strict=True):
            sample.reward += self.pc.rewards[name]["weight"] * response.score
            lowest[name] = min(lowest.get(name, 0.0), response.score)
        for sample, names in empty:  # never above a wrong answer: the step's lowest score, 0 at most
            sample.reward += sum(self.pc.rewards[name]["weight"] * lowest.get(name, 0.0) for name in names)

    def train(self, samples: list[Sample]) -> dict:
        from fabric.trainer import losses
        from fabric.trainer.algorithm import compute_advantages
        from fabric.trainer.policy import TrainBatch

        a = self.pc.algorithm
        pad = self.tokenizer.pad_token_id
        batch = TrainBatch.from_token_lists(
            [list(s.response.prompt_token_ids) for s in samples],
            [list(s.response.token_ids) for s in samples],
            pad_id=pad,
        )
        stale = torch.tensor([s.response.weight_version != self.version for s in samples])
        valid = ~stale if self.pc.stale_policy == "drop" else torch.ones_like(stale)
        truncated = torch.tensor([s.response.finish_reason == rollout_pb2.FINISH_REASON_LENGTH for s in samples])
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        batch.old_logprobs = self.policy.logprobs(batch)
        batch.ref_logprobs = self.reference.logprobs(batch)
        # training-inference mismatch: the rollout's logprobs against the trainer's for the same tokens (fresh ones)
        rollout_lp = torch.zeros_like(batch.old_logprobs)
        for row, sample in enumerate(samples):
            start = len(sample.response.prompt_token_ids)
            lp = list(sample.response.logprobs)
            rollout_lp[row, start : start + len(lp)] = torch.tensor(lp)
        fresh = batch.response_mask.bool() & ~stale[:, None]
        gap = (rollout_lp - batch.old_logprobs)[fresh]
        kl = float(losses.masked_mean(losses.kl_penalty(batch.old_logprobs, batch.ref_logprobs), batch.response_mask))
        adv = compute_advantages(
            a,
            rewards,
            batch.response_mask,
            self.pc.group_size,
            valid=valid,
            truncated=truncated,
            old_logprobs=batch.old_logprobs,
            ref_logprobs=batch.ref_logprobs,
            kl_ctrl=self.kl_ctrl,
        )
        batch.advantages, batch.response_mask = adv.advantages, adv.mask
        steps = []
        if adv.mask.any():  # else nothing to learn from (ROLL skips such a step too)
            generator = torch.Generator().manual_seed(self.pc.seed + self.step)
            for _ in range(a.ppo_epochs):
                order = torch.randperm(len(batch), generator=generator)
                if len(batch) <= a.mini_batch_size:
                    order = torch.arange(len(batch))
                for start in range(0, len(batch), a.mini_batch_size):
                    steps.append(self.policy.train_step(batch.rows(order[start : start + a.mini_batch_size])))

        def mean(key: str) -> float:
            return sum(float(m.get(key, 0.0)) for m in steps) / len(steps) if steps else 0.0

        weights = sum(spec["weight"] for spec in self.pc.rewards.values())
        return {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "loss": mean("loss"),
            "kl": kl,
            "logprob_mismatch": float(gap.abs().mean()) if gap.numel() else 0.0,
            "stale_samples": int(stale.sum()),
            "extra": {
                "accuracy": float((rewards >= 0.999 * weights).float().mean()),
                "grad_norm": mean("grad_norm"),
                "lr": float(steps[-1]["lr"]) if steps else 0.0,
                "optimizer_steps": float(len(steps)),
                # rollout minus trainer logprob: > 0 is top-p / top-k truncation (vLLM renormalizes over the kept
                # tokens; the trainer's logprobs are over the whole vocabulary)
                "logprob_gap_mean": float(gap.mean()) if gap.numel() else 0.0,
                "clip_frac": mean("clip_frac"),
                **{k: float(v) for k, v in adv.metrics.items()},
            },
        }

    async def push_weights(self, targets: list[str] | None = None, version: int | None = None) -> float:
        """Pushes the policy's weights to every live rollout server (relay by default), as the next version unless
        `version` says otherwise (re-admitting a server: the current one)."""
        from fabric.weights.sender import WeightSource, push_weights, serving_dtype, weights_status

        targets = targets if targets is not None else self.rollouts.alive
        if not targets:
            raise RuntimeError("no rollout server left to push weights to")
        started = time.perf_counter()
        if self.serving_dtype is None:
            found = await asyncio.gather(
                *(weights_status(t, timeout=self.pc.rpc_timeout_s) for t in targets), return_exceptions=True
            )
            statuses = [s for s in found if not isinstance(s, BaseException)]
            if not statuses:
                raise RuntimeError(f"no rollout server answers: {found[0]}")
            self.serving_dtype = serving_dtype(statuses)
        source = await asyncio.to_thread(
            WeightSource, self.policy.hf_weights(), int(self.pc.chunk_mib * 2**20), self.serving_dtype
        )
        version = self.version + 1 if version is None else version
        result = await push_weights(
            source,
            targets,
            version=version,
            mode=self.pc.sync_mode,
            transport=self.pc.sync_transport,
            timeout=self.pc.push_timeout_s,
        )
        for failed in result.failed:
            self.rollouts.mark_dead(
                failed.server, f"weight update to version {version} failed: {failed.error.message or 'not committed'}"
            )
        if not self.rollouts.alive:
            raise RuntimeError(f"weight update to version {version} failed on every rollout server")
        self.version = max(self.version, version)
        return time.perf_counter() - started

    async def readmit_servers(self) -> None:
        """A lost rollout server that answers again is brought to the current version, then routed to."""
        from fabric.weights.sender import weights_status

        for address, server in list(self.rollouts.servers.items()):
            if server.alive:
                continue
            try:
                await weights_status(address, timeout=2)
            except Exception:
                continue
            try:
                await self.push_weights([address], version=self.version)
                if (await weights_status(address, timeout=self.pc.rpc_timeout_s)).serving_version != self.version:
                    raise RuntimeError(f"it does not serve version {self.version} after the update")
            except Exception as exc:
                log.warning("could not re-admit %s: %s", address, exc)
                continue
            await self.rollouts.admit(address)
            log.info("rollout server %s re-admitted at version %d", address, self.version)

    def record(self, metrics: dict) -> None:
        self.history.append(metrics)
        report.append_jsonl(self.metrics_path, metrics)
        message = report.to_proto(metrics)
        for queue in self.subscribers:
            queue.put_nowait(message)
        log.info(
            "step %d  reward %.3f  acc %.2f  loss %+.4f  kl %.4f  mismatch %.1e  version %d  (%.1f s)",
            metrics["step"],
            metrics["reward_mean"],
            metrics["extra"]["accuracy"],
            metrics["loss"],
            metrics["kl"],
            metrics["logprob_mismatch"],
            metrics["weight_version"],
            metrics["step_seconds"],
        )

    async def save_checkpoint(self, path: Path) -> Path:
        saved = await asyncio.to_thread(self.policy.save, path)
        log.info("checkpoint saved to %s", saved)
        return Path(saved)
