"""The GRPO loop, trainer-driven: `fabric train --config FILE`.

One step:
    prompts --Generate--> rollout servers (RolloutPool: least-loaded, failover)  -> samples with weight_version
    samples --Score-----> reward servers (RewardPool: retries elsewhere), each as it streams out of Generate
    advantages as ROLL's keys say (algorithm.py: grpo / reinforce, masks, clips, whitening, in-reward KL)
    -> mini-batches: clipped policy loss (+ ROLL's KL loss) -> AdamW steps on fp32 main params, LR schedule
    policy weights --UpdateWeights (relay chain)--> every live rollout server      -> version + 1
The run keeps one Generate stream (through the pool) open: a producer submits step s's prompts once the version
the servers serve is at least the one step s trains with minus `async_training.max_staleness` k, so with k = 0
each step generates after the previous push (strictly in turn, as before) and with k > 0 rollouts of up to k steps
ahead run while the trainer trains; a push then lands mid-stream (the servers pause in keep mode, commit, resume;
`partial_rollout: regenerate` drops a sample that spans two versions and generates it again). A sample's staleness
is the policy's version minus the first version it was generated under; samples beyond k ("stale": e.g. from a
server that missed an update) are counted and, by default, left out of the loss and of their group's statistics
(`stale_samples: drop`); `use` keeps them. Samples within the bound but from an older version are weighted by
truncated importance ratios against the rollout's own logprobs (`off_policy_correction`: tis / decoupled / none;
algorithm.off_policy_weights). An empty response (EOS at once) is never sent to the reward servers (they refuse
it) and scores each reward's lowest weighted score of the step, or 0 if that is lower: it never beats a wrong
answer, whatever the sign of a reward's weight.
The rollout servers may start with `load_format: dummy`: the first push (version 1) happens before any rollout.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fabric.config.sampling import sampling_settings
from fabric.errors import precondition
from fabric.routing import RewardPool, RolloutPool
from fabric.trainer import report
from fabric.trainer.algorithm import KLController, off_policy_weights
from fabric.trainer.colocate import Colocation
from fabric.trainer.config import PipelineConfig
from fabric.v1 import rollout_pb2, trainer_pb2

log = logging.getLogger(__name__)

FINAL_STATES = (trainer_pb2.TRAINER_STATE_FINISHED, trainer_pb2.TRAINER_STATE_FAILED)


@dataclass
class Sample:
    prompt_index: int
    response: rollout_pb2.GenerateResponse
    reward: float = 0.0
    domain: str = ""  # its reward domain (PipelineConfig.domain_of): advantages are computed per domain, as ROLL
    # its domain reward's 0/1 correctness score (else that reward's score), which the difficulty mask filters on
    correct: float | None = None


def domain_rewards(samples: list[Sample], rewards: torch.Tensor) -> dict[str, float]:
    """Each reward domain's mean reward and correctness ("reward/<domain>", "correct/<domain>"), when there are two
    domains or more."""
    domains = list(dict.fromkeys(s.domain for s in samples))
    if len(domains) < 2:
        return {}
    out = {}
    for domain in domains:
        rows = [k for k, s in enumerate(samples) if s.domain == domain]
        out[f"reward/{domain}"] = float(rewards[rows].mean())
        known = [c for k in rows if (c := samples[k].correct) is not None]
        if known:
            out[f"correct/{domain}"] = sum(known) / len(known)
    return out


def sample_versions(response: rollout_pb2.GenerateResponse) -> tuple[int, int]:
    """(first, last) weight version a sample was generated under (a sample spans two when an update landed)."""
    first = response.first_weight_version or response.weight_version
    return first, max(response.last_weight_version, first)


def trainer_peak_gib() -> float:
    """The trainer's peak device memory since the last call (0 on CPU)."""
    if not torch.cuda.is_available():
        return 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def behind_servers_message(samples: list, stale: list[bool], version: int) -> str:
    """One line for a step in turn (max_staleness 0) that got samples of an older version: a rollout server missed
    a weight update, which the push should have reported; training on (or silently dropping) them would hide it."""
    by_server: dict[str, set[int]] = {}
    for sample, old in zip(samples, stale, strict=True):
        if old:
            by_server.setdefault(sample.response.server or "?", set()).add(sample_versions(sample.response)[0])
    where = "; ".join(f"{server} served version {sorted(v)}" for server, v in sorted(by_server.items()))
    return (
        f"{sum(stale)} of {len(samples)} samples were generated under an older weight version than the policy's "
        f"{version} at max_staleness 0 ({where}): a rollout server missed a weight update; stopping"
    )


def parse_request_id(request_id: str) -> tuple[int, int, int, bool]:
    """ "s{step}-p{k}" (a step's k-th prompt) or "s{step}-p{k}-j{j}-r{n}" (its sample j generated again): (step, k,
    j, is_regeneration)."""
    step, rest = request_id[1:].split("-p", 1)
    if "-j" in rest:
        k, tail = rest.split("-j", 1)
        return int(step), int(k), int(tail.split("-r", 1)[0]), True
    return int(step), int(rest), 0, False


@dataclass
class StepBatch:
    """One step's samples while they are generated and scored."""

    step: int
    expected: int
    prompts: list[int] | None = None  # dataset rows, set when the producer submits the step
    samples: dict[tuple[int, int], Sample] = field(default_factory=dict)
    unscored: list[Sample] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    scoring: asyncio.Task | None = None
    started: float = 0.0  # first request submitted
    generated: float = 0.0  # last sample in
    scored: float = 0.0  # last score in
    spanning: int = 0  # samples that spanned a weight update
    regenerated: int = 0  # of those, generated again (partial_rollout: regenerate)

    def add(self, sample: Sample) -> None:
        key = (int(sample.response.request_id.split("-p", 1)[1].split("-", 1)[0]), sample.response.sample_index)
        if key in self.samples:
            raise RuntimeError(f"sample {key} of step {self.step} delivered twice")
        self.samples[key] = sample
        self.unscored.append(sample)
        if len(self.samples) == self.expected:
            self.generated = time.perf_counter()
        self.arrived.set()


class BusyClock:
    """When generation was running (any sample outstanding), as intervals, to measure the overlap with training."""

    def __init__(self):
        self.outstanding = 0
        self.since: float | None = None
        self.intervals: list[tuple[float, float]] = []

    def add(self, n: int, now: float) -> None:
        if self.outstanding == 0 and n > 0:
            self.since = now
        self.outstanding += n

    def sub(self, n: int, now: float) -> None:
        self.outstanding -= n
        if self.outstanding <= 0 and self.since is not None:
            self.intervals.append((self.since, now))
            self.since, self.outstanding = None, 0

    def busy_between(self, a: float, b: float) -> float:
        spans = self.intervals + ([(self.since, b)] if self.since is not None else [])
        return sum(max(0.0, min(end, b) - max(start, a)) for start, end in spans)

    def forget_before(self, t: float) -> None:
        self.intervals = [(s, e) for s, e in self.intervals if e > t]


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
        self._rollouts: RolloutPool | None = None  # set by run()
        self._rewards: RewardPool | None = None
        self.metrics_path = pc.out / "metrics.jsonl"
        self.serving_dtype: torch.dtype | None = None
        a = pc.algorithm
        self.kl_ctrl = KLController(a.init_kl_coef, a.target_kl, a.kl_horizon)
        self.sampling = sampling_settings(pc.sampling)
        # the asynchronous machinery: one Generate stream for the run, a batch per step, the versions released
        self.batches: dict[int, StepBatch] = {}
        self.requests: asyncio.Queue = asyncio.Queue()
        self.version_cond = asyncio.Condition()
        self.first_version = 1
        self.released_version = 0
        self.gen_clock = BusyClock()
        self.run_started = self.last_step_end = time.perf_counter()

    @property
    def rollouts(self) -> RolloutPool:
        if self._rollouts is None:
            raise RuntimeError("no rollout servers: the run has not started")
        return self._rollouts

    @rollouts.setter
    def rollouts(self, pool: RolloutPool) -> None:
        self._rollouts = pool

    @property
    def rewards(self) -> RewardPool:
        if self._rewards is None:
            raise RuntimeError("no reward servers: the run has not started")
        return self._rewards

    @rewards.setter
    def rewards(self, pool: RewardPool) -> None:
        self._rewards = pool

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
        tasks: list[asyncio.Task] = []
        try:
            sync_seconds = await self.push_weights()  # version 1: the servers may hold dummy weights
            log.info("initial weights pushed as version %d in %.2f s", self.version, sync_seconds)
            self.first_version = self.version
            self.last_step_end = self.run_started = time.perf_counter()
            await self.release_version()
            self.state = trainer_pb2.TRAINER_STATE_RUNNING
            tasks = [asyncio.create_task(self.produce()), asyncio.create_task(self.consume())]
            while self.step < self.pc.max_steps and not self.stop_requested:
                await self.resume_event.wait()
                if self.stop_requested:
                    break
                batch = self.batch(self.step + 1)
                assert batch.scoring is not None  # batch() starts it
                await self.wait_for(batch.scoring, tasks)
                async with self.lock:
                    metrics = await self.finish_step(batch)
                self.step += 1
                self.record(metrics)
                if self.pc.save_steps and self.step % self.pc.save_steps == 0:
                    await self.save_checkpoint(self.pc.out / "checkpoints" / f"step_{self.step}")
            self.state = trainer_pb2.TRAINER_STATE_STOPPING
            await self.stop_generating(tasks)
            await self.save_checkpoint(self.pc.out / "checkpoints" / "final")
            self.state = trainer_pb2.TRAINER_STATE_FINISHED
        except Exception as exc:
            self.state = trainer_pb2.TRAINER_STATE_FAILED
            self.message = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            await self.stop_generating(tasks)
            report.write_plot(self.history, self.pc.out / "metrics.png")
            for queue in self.subscribers:
                queue.put_nowait(None)
            await self.rollouts.close()
            await self.rewards.close()

    def next_prompts(self) -> list[int]:
        picked: list[int] = []
        while len(picked) < self.pc.rollout_batch_size:
            if not self.order:
                self.order = list(range(len(self.dataset)))
                self.rng.shuffle(self.order)
            picked.append(self.order.pop())
        return picked

    # ---- generation and scoring, as a stream (asynchronous with max_staleness > 0) ----------------------------

    def batch(self, step: int) -> StepBatch:
        """The samples of `step`, made by whichever asks first (the producer fills it, the loop waits on it)."""
        if step not in self.batches:
            batch = StepBatch(step, self.pc.rollout_batch_size * self.pc.group_size)
            batch.scoring = asyncio.create_task(self.score_stream(batch))
            self.batches[step] = batch
        return self.batches[step]

    async def release_version(self) -> None:
        """Lets the producer start the steps the current version may generate for (after a push and re-admission)."""
        async with self.version_cond:
            self.released_version = self.version
            self.version_cond.notify_all()

    async def produce(self) -> None:
        """Submits step s's prompts once the released version is at least the one step s trains with, minus k: with
        max_staleness 0, after the previous step's push (today's loop); with k, up to k steps ahead of training."""
        k = self.pc.max_staleness
        for step in range(1, self.pc.max_steps + 1):
            needed = self.first_version + step - 1 - k
            async with self.version_cond:
                await self.version_cond.wait_for(functools.partial(self.released_or_stopped, needed))
            await self.resume_event.wait()
            if self.stop_requested:
                return
            batch = self.batch(step)
            batch.prompts = self.next_prompts()
            batch.started = time.perf_counter()
            sampling = rollout_pb2.SamplingParams(**self.sampling, logprobs=True)
            for k_, i in enumerate(batch.prompts):
                self.submit(
                    rollout_pb2.GenerateRequest(
                        request_id=f"s{step}-p{k_}", prompt=self.dataset[i]["prompt"], sampling=sampling
                    )
                )

    def released_or_stopped(self, version: int) -> bool:
        return self.released_version >= version or self.stop_requested

    def submit(self, request: rollout_pb2.GenerateRequest) -> None:
        self.gen_clock.add(request.sampling.num_return_sequences, time.perf_counter())
        self.requests.put_nowait(request)

    async def request_stream(self):
        while (request := await self.requests.get()) is not None:
            yield request

    async def consume(self) -> None:
        """Reads the run's one Generate stream (through the pool: failover, nothing lost or twice) and hands each
        sample to its step's batch, whose scorer sends it to the reward servers at once."""
        stream = self.rollouts.generate(self.request_stream())
        try:
            async for response in stream:
                self.gen_clock.sub(1, time.perf_counter())
                if response.HasField("error"):
                    raise RuntimeError(f"rollout refused {response.request_id}: {response.error.message}")
                step, k, j, retry = parse_request_id(response.request_id)
                index = j if retry else response.sample_index
                batch = self.batches.get(step)
                if batch is None or batch.prompts is None:
                    continue
                prompt = batch.prompts[k]
                first, last = sample_versions(response)
                if first != last:
                    batch.spanning += 1
                    if self.pc.partial_rollout == "regenerate":  # generated again under one version
                        batch.regenerated += 1
                        again = rollout_pb2.GenerateRequest()
                        again.CopyFrom(self.regen_template(prompt))
                        again.request_id = f"s{step}-p{k}-j{index}-r{batch.regenerated}"
                        if again.sampling.HasField("seed"):
                            again.sampling.seed += index
                        self.submit(again)
                        continue
                response.sample_index = index
                batch.add(Sample(prompt, response))
        finally:
            await stream.aclose()

    def regen_template(self, prompt_index: int) -> rollout_pb2.GenerateRequest:
        sampling = rollout_pb2.SamplingParams(**self.sampling, logprobs=True)
        sampling.num_return_sequences = 1
        return rollout_pb2.GenerateRequest(prompt=self.dataset[prompt_index]["prompt"], sampling=sampling)

    async def score_stream(self, batch: StepBatch) -> None:
        """Scores the batch's samples as they arrive: whatever came in while the previous call ran goes in the next
        one. Ends when every sample is scored (empty responses last: they need the step's lowest score)."""
        lowest: dict[str, float] = {}
        empty: list = []
        scored = 0
        while True:
            await batch.arrived.wait()
            batch.arrived.clear()
            todo, batch.unscored = batch.unscored, []
            if todo:
                empty += await self.score_items(todo, batch.step, lowest, start=scored)
                scored += len(todo)
            if scored == batch.expected:
                break
        self.score_empty(empty, lowest)
        batch.scored = time.perf_counter()

    async def wait_for(self, task: asyncio.Task, helpers: list[asyncio.Task]) -> None:
        """Waits for `task`; a producer or consumer that fails meanwhile fails the run with its error."""
        while not task.done():
            watched = {task, *(t for t in helpers if not t.done() or (not t.cancelled() and t.exception()))}
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            for helper in done - {task}:
                if not helper.cancelled() and helper.exception() is not None:
                    raise helper.exception()  # type: ignore[misc]
        task.result()

    async def stop_generating(self, tasks: list[asyncio.Task]) -> None:
        self.stop_requested = self.stop_requested or self.step >= self.pc.max_steps
        async with self.version_cond:
            self.version_cond.notify_all()
        self.requests.put_nowait(None)
        for task in tasks + [b.scoring for b in self.batches.values() if b.scoring is not None]:
            task.cancel()
        await asyncio.gather(*tasks, *(b.scoring for b in self.batches.values() if b.scoring), return_exceptions=True)
        tasks.clear()
        self.batches.clear()

    async def finish_step(self, batch: StepBatch) -> dict:
        """Trains on a whole, scored batch, pushes the next version (an in-flight update when later steps are
        generating: the servers pause in keep mode, commit, resume) and releases the next step's generation."""
        self.batches.pop(batch.step, None)
        t_ready = time.perf_counter()
        ordered = [batch.samples[(k, j)] for k in range(len(batch.prompts or [])) for j in range(self.pc.group_size)]
        if self.pc.max_staleness == 0:  # in turn: every sample is of the version just pushed, or a server missed it
            behind = [sample_versions(s.response)[0] < self.version for s in ordered]
            if any(behind):
                raise RuntimeError(behind_servers_message(ordered, behind, self.version))
        colocation = None
        if self.pc.colocate:  # generation and training take turns on the device: the servers sleep meanwhile
            stubs = [self.rollouts.servers[a].stub for a in self.rollouts.alive]
            colocation = Colocation(stubs, self.pc.sleep_level, self.pc.rpc_timeout_s)
            await colocation.sleep()
        metrics = await asyncio.to_thread(self.train, ordered)
        t_trained = time.perf_counter()
        if colocation is not None:
            await colocation.wake(["weights"])
        sync_seconds = await self.push_weights()
        if colocation is not None:
            await colocation.wake(["kv_cache"])
            metrics["extra"].update(colocation.seconds, **colocation.memory, trainer_peak_gib=trainer_peak_gib())
        await self.readmit_servers()
        t_end = time.perf_counter()
        await self.release_version()
        generated = sum(len(s.response.token_ids) for s in ordered)
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
            samples=len(ordered),
            response_length_mean=generated / len(ordered),
        )
        metrics["extra"].update(
            rollout_servers_alive=float(len(self.rollouts.alive)),
            overlap_seconds=self.gen_clock.busy_between(t_ready, t_end),  # generation running while training/syncing
            wait_seconds=max(t_ready - self.last_step_end, 0.0),  # the trainer idle, waiting for this batch
            elapsed_seconds=t_end - self.run_started,
            spanning_samples=float(batch.spanning),
            regenerated_samples=float(batch.regenerated),
        )
        self.last_step_end = t_end
        self.gen_clock.forget_before(t_end)
        return metrics

    async def score(self, samples: list[Sample], step: int) -> None:
        lowest: dict[str, float] = {}
        self.score_empty(await self.score_items(samples, step, lowest), lowest)

    async def score_items(self, samples: list[Sample], step: int, lowest: dict[str, float], start: int = 0) -> list:
        """Scores the non-empty samples (adding to each reward and to `lowest`, each reward's lowest weighted score);
        returns the empty ones with their reward names, for score_empty once the step's lowest scores are known."""
        items, owners, empty = [], [], []
        for n, sample in enumerate(samples, start):
            row = self.dataset[sample.prompt_index]
            names = self.pc.rewards_for(row.get("tag"))
            sample.domain = self.pc.domain_of(row.get("tag"))
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
        for (sample, name), response in zip(owners, responses, strict=True):
            weighted = self.pc.rewards[name]["weight"] * response.score
            sample.reward += weighted
            lowest[name] = min(lowest.get(name, 0.0), weighted)  # the worst weighted value, whatever the weight's sign
            if name == sample.domain:
                sample.correct = response.correct if response.HasField("correct") else response.score
        return empty

    def score_empty(self, empty: list, lowest: dict[str, float]) -> None:
        for sample, names in empty:  # never above a wrong answer: each reward's lowest weighted score, 0 at most
            sample.reward += sum(lowest.get(name, 0.0) for name in names)
            sample.correct = 0.0

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
        first = torch.tensor([sample_versions(s.response)[0] for s in samples])
        staleness = (self.version - first).clamp(min=0)  # versions between the policy and the sample's first
        stale = staleness > self.pc.max_staleness  # beyond the bound (k = 0: any older version)
        off_policy = first != self.version
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
        fresh = batch.response_mask.bool() & ~off_policy[:, None]
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
            correct=torch.tensor([s.reward if s.correct is None else s.correct for s in samples]),
            domains=[s.domain for s in samples],
        )
        # asynchronous RL: samples from older versions weighted by rollout -> current importance ratios (the
        # rollout's own logprobs as the behaviour policy); samples of the current version keep weight 1 exactly
        weights, correction = off_policy_weights(
            rollout_lp, batch.old_logprobs, adv.mask, off_policy & ~stale, self.pc.off_policy_correction,
            self.pc.importance_cap,
        )  # fmt: skip
        batch.advantages, batch.response_mask = adv.advantages * weights, adv.mask
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
                **correction,
                "staleness_mean": float(staleness.float().mean()),
                "staleness_max": float(staleness.max()),
                **domain_rewards(samples, rewards),
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
