"""The GRPO loop, trainer-driven: `fabric train --config FILE`. `Trainer` composes the run's parts and holds its
controls (pause, resume, stop: the TrainerService calls them), metrics and checkpoints.

One step:
    prompts --Generate--> rollout servers (RolloutPool: least-loaded, failover)  -> samples with weight_version
    samples --Score-----> reward servers (RewardPool: retries elsewhere), each as it streams out of Generate
    advantages as ROLL's keys say -> mini-batches: clipped policy loss -> AdamW steps on fp32 main params
    policy weights --UpdateWeights (relay chain)--> every live rollout server      -> version + 1

The parts, each built from the few settings it uses:
    rollout_stream.py  RolloutStream: one Generate stream for the run; the producer (up to max_staleness k steps
                       ahead of training), partial rollouts, the staleness filter
    scoring.py         Scorer: each sample's rewards and reward domain, as it arrives
    step.py            train_step: the step's maths (algorithm.py, losses.py) and optimizer steps on a scored batch
    sync.py            WeightSync: the weight push, the servers taken out of routing and re-admitted
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from fabric.errors import precondition
from fabric.routing import RewardPool, RolloutPool
from fabric.trainer import report
from fabric.trainer.algorithm import KLController
from fabric.trainer.colocate import trainer_peak_gib
from fabric.trainer.config import PipelineConfig
from fabric.trainer.rollout_stream import RolloutStream, Sample, StepBatch, check_in_turn
from fabric.trainer.scoring import Scorer
from fabric.trainer.settings import reward_settings, step_settings, stream_settings, sync_settings
from fabric.trainer.step import train_step
from fabric.trainer.sync import WeightSync
from fabric.v1 import trainer_pb2

log = logging.getLogger(__name__)

FINAL_STATES = (trainer_pb2.TRAINER_STATE_FINISHED, trainer_pb2.TRAINER_STATE_FAILED)


class Trainer:
    """Owns the policy and the run's parts; `run()` drives the steps, the TrainerService reads and steers it."""

    def __init__(self, pc: PipelineConfig, policy, reference, tokenizer, dataset: list[dict]):
        self.pc = pc
        self.policy = policy
        self.reference = reference
        self.tokenizer = tokenizer
        self.state = trainer_pb2.TRAINER_STATE_STARTING
        self.message = ""
        self.step = 0
        self.history: list[dict] = []
        self.subscribers: set[asyncio.Queue] = set()
        self.resume_event = asyncio.Event()
        self.resume_event.set()
        self.stop_requested = False
        self.lock = asyncio.Lock()  # held while the weights change: a checkpoint waits for a whole step
        self.metrics_path = pc.out / "metrics.jsonl"
        a = pc.algorithm
        self.kl_ctrl = KLController(a.init_kl_coef, a.target_kl, a.kl_horizon)
        self.scorer = Scorer(reward_settings(pc), dataset)
        self.stream = RolloutStream(
            stream_settings(pc), dataset, self.scorer.score_stream, self.resume_event, lambda: self.stop_requested
        )
        self.sync = WeightSync(policy, sync_settings(pc))
        self.run_started = self.last_step_end = time.perf_counter()

    @property
    def version(self) -> int:
        """The policy's weight version: the last one pushed."""
        return self.sync.version

    @version.setter
    def version(self, version: int) -> None:
        self.sync.version = version

    @property
    def rollouts(self) -> RolloutPool:
        return self.sync.pool

    @rollouts.setter
    def rollouts(self, pool: RolloutPool) -> None:
        self.sync.pool = pool

    @property
    def rewards(self) -> RewardPool:
        return self.scorer.pool

    @rewards.setter
    def rewards(self, pool: RewardPool) -> None:
        self.scorer.pool = pool

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
        self.rollouts = RolloutPool(rollout_addresses, stream_timeout=None)  # one stream for the run: no deadline
        self.rewards = RewardPool(reward_addresses, timeout=self.pc.score_timeout_s)
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self.metrics_path.write_text("")
        try:
            sync_seconds = await self.sync.push()  # version 1: the servers may hold dummy weights
            log.info("initial weights pushed as version %d in %.2f s", self.version, sync_seconds)
            self.last_step_end = self.run_started = time.perf_counter()
            await self.stream.release(self.version)
            self.state = trainer_pb2.TRAINER_STATE_RUNNING
            self.stream.start(self.rollouts, first_version=self.version)
            while self.step < self.pc.max_steps and not self.stop_requested:
                await self.resume_event.wait()
                if self.stop_requested:
                    break
                batch = await self.stream.scored(self.step + 1)
                async with self.lock:
                    metrics = await self.finish_step(batch)
                self.step += 1
                self.record(metrics)
                if self.pc.save_steps and self.step % self.pc.save_steps == 0:
                    await self.save_checkpoint(self.pc.out / "checkpoints" / f"step_{self.step}")
            self.state = trainer_pb2.TRAINER_STATE_STOPPING
            await self.stream.close()
            await self.save_checkpoint(self.pc.out / "checkpoints" / "final")
            self.state = trainer_pb2.TRAINER_STATE_FINISHED
        except Exception as exc:
            self.state = trainer_pb2.TRAINER_STATE_FAILED
            self.message = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            await self.stream.close()
            report.write_plot(self.history, self.pc.out / "metrics.png")
            for queue in self.subscribers:
                queue.put_nowait(None)
            await self.rollouts.close()
            await self.rewards.close()
            await self.sync.close()

    async def finish_step(self, batch: StepBatch) -> dict:
        """Trains on a whole, scored batch, pushes the next version (an in-flight update when later steps are
        generating: the servers pause in keep mode, commit, resume) and releases the next step's generation."""
        t_ready = time.perf_counter()
        samples = batch.ordered()
        if self.pc.max_staleness == 0:  # in turn: every sample is of the version just pushed, or a server missed it
            check_in_turn(samples, self.version)
        colocation = self.sync.colocation()  # generation and training take turns on the device
        if colocation is not None:
            await colocation.sleep()
        metrics = await asyncio.to_thread(self.train, samples)
        t_trained = time.perf_counter()
        if colocation is not None:
            await colocation.wake(["weights"])
        sync_seconds = await self.sync.push()
        if colocation is not None:
            await colocation.wake(["kv_cache"])
            metrics["extra"].update(colocation.seconds, **colocation.memory, trainer_peak_gib=trainer_peak_gib())
        await self.sync.readmit()
        t_end = time.perf_counter()
        await self.stream.release(self.version)
        generated = sum(len(s.response.token_ids) for s in samples)
        generate_seconds = max(batch.generated - batch.started, 1e-9)
        metrics.update(
            step=batch.step,
            weight_version=self.version,
            generate_seconds=generate_seconds,
            reward_seconds=max(batch.scored - batch.generated, 0.0),  # scoring after the last sample: the tail
            train_seconds=t_trained - t_ready,
            weight_sync_seconds=sync_seconds,
            step_seconds=t_end - self.last_step_end,
            tokens_per_second=generated / generate_seconds,
            samples=len(samples),
            response_length_mean=generated / len(samples),
        )
        metrics["extra"].update(
            rollout_servers_alive=float(len(self.rollouts.alive)),
            wait_seconds=max(t_ready - self.last_step_end, 0.0),  # the trainer idle, waiting for this batch
            elapsed_seconds=t_end - self.run_started,
            **self.stream.generation_metrics(batch, t_ready, t_end),
        )
        self.last_step_end = t_end
        return metrics

    def train(self, samples: list[Sample]) -> dict:
        """The step's maths and optimizer steps (step.py), with the config's settings as they are now."""
        settings, pad = step_settings(self.pc), self.tokenizer.pad_token_id
        return train_step(self.policy, self.reference, samples, settings, self.version, self.step, pad, self.kl_ctrl)

    # what the tests drive directly (a part's own call)
    async def score(self, samples: list[Sample], step: int) -> None:
        await self.scorer.score(samples, step)

    async def push_weights(self, targets: list[str] | None = None, version: int | None = None) -> float:
        return await self.sync.push(targets, version)

    async def readmit_servers(self) -> None:
        await self.sync.readmit()

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
