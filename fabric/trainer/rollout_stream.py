"""The generation stream: one Generate stream (through the RolloutPool) for the whole run, a batch per step.

A producer submits step s's prompts once the version the servers serve is at least the one step s trains with
minus `async_training.max_staleness` k: with k = 0 each step generates after the previous push (strictly in turn),
with k > 0 rollouts of up to k steps ahead run while the trainer trains, and a push then lands mid-stream (the
servers pause in keep mode, commit, resume). A consumer reads the stream and hands each sample to its step's
StepBatch, whose scorer sends it to the reward servers at once. `partial_rollout: regenerate` drops a sample that
spans two versions and asks for it again.

Staleness: a sample's staleness is the policy's version minus the first version it was generated under; samples
beyond k ("stale": e.g. from a server that missed an update) leave the loss and their group's statistics with
`stale_samples: drop` (`use` keeps them); at k = 0 a sample of an older version stops the run, naming the server.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import torch

from fabric.routing import RolloutPool
from fabric.v1 import rollout_pb2


@dataclass
class Sample:
    prompt_index: int
    response: rollout_pb2.GenerateResponse
    reward: float = 0.0
    domain: str = ""  # its reward domain (PipelineConfig.domain_of): advantages are computed per domain, as ROLL
    # its domain reward's 0/1 correctness score (else that reward's score), which the difficulty mask filters on
    correct: float | None = None


def sample_versions(response: rollout_pb2.GenerateResponse) -> tuple[int, int]:
    """(first, last) weight version a sample was generated under (a sample spans two when an update landed)."""
    first = response.first_weight_version or response.weight_version
    return first, max(response.last_weight_version, first)


def parse_request_id(request_id: str) -> tuple[int, int, int, bool]:
    """ "s{step}-p{k}" (a step's k-th prompt) or "s{step}-p{k}-j{j}-r{n}" (its sample j generated again): (step, k,
    j, is_regeneration)."""
    step, rest = request_id[1:].split("-p", 1)
    if "-j" in rest:
        k, tail = rest.split("-j", 1)
        return int(step), int(k), int(tail.split("-r", 1)[0]), True
    return int(step), int(rest), 0, False


# ---- staleness ---------------------------------------------------------------------------------------------------


@dataclass
class Staleness:
    """Per sample [N], against the policy's version."""

    behind: torch.Tensor  # versions between the policy and the sample's first
    stale: torch.Tensor  # beyond the bound (k = 0: any older version)
    off_policy: torch.Tensor  # generated under another version than the policy's
    valid: torch.Tensor  # enters the loss and its group's statistics


def staleness(samples: list[Sample], version: int, max_staleness: int, drop_stale: bool) -> Staleness:
    first = torch.tensor([sample_versions(s.response)[0] for s in samples])
    behind = (version - first).clamp(min=0)
    stale = behind > max_staleness
    return Staleness(behind, stale, first != version, ~stale if drop_stale else torch.ones_like(stale))


def check_in_turn(samples: list[Sample], version: int) -> None:
    """At max_staleness 0 every sample is of the version just pushed. One that is not comes from a rollout server
    that missed a weight update, which the push should have reported; training on (or silently dropping) it would
    hide that: the run stops with one line naming the server."""
    stale = [sample_versions(s.response)[0] < version for s in samples]
    if any(stale):
        raise RuntimeError(behind_servers_message(samples, stale, version))


def behind_servers_message(samples: list[Sample], stale: list[bool], version: int) -> str:
    by_server: dict[str, set[int]] = {}
    for sample, old in zip(samples, stale, strict=True):
        if old:
            by_server.setdefault(sample.response.server or "?", set()).add(sample_versions(sample.response)[0])
    where = "; ".join(f"{server} served version {sorted(v)}" for server, v in sorted(by_server.items()))
    return (
        f"{sum(stale)} of {len(samples)} samples were generated under an older weight version than the policy's "
        f"{version} at max_staleness 0 ({where}): a rollout server missed a weight update; stopping"
    )


# ---- a step's batch, and when generation ran -------------------------------------------------------------------


@dataclass
class StepBatch:
    """One step's samples while they are generated and scored."""

    step: int
    group_size: int
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

    def ordered(self) -> list[Sample]:
        """The samples prompt by prompt, each prompt's group in sample order (the layout GRPO's groups assume)."""
        return [self.samples[(k, j)] for k in range(len(self.prompts or [])) for j in range(self.group_size)]


class BusyClock:
    """When generation was running (any sample outstanding), as intervals, to measure the overlap with training."""

    def __init__(self) -> None:
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


# ---- the stream --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSettings:
    max_steps: int
    prompts_per_step: int  # rollout_batch_size
    group_size: int  # samples per prompt
    max_staleness: int  # k
    partial_rollout: str  # keep | regenerate
    sampling: dict[str, Any]  # what every request carries (fabric.config.sampling.sampling_settings)
    seed: int  # the prompt order's


class RolloutStream:
    """The run's generation: `start` opens the stream, `release` lets it generate for a new version, `scored`
    waits for a step's scored batch, `close` ends it. `score(batch)` scores a batch's samples as they arrive;
    `resume` and `stopped` are the trainer's controls (the producer holds while paused, ends when stopped)."""

    def __init__(
        self,
        settings: StreamSettings,
        dataset: list[dict],
        score: Callable[[StepBatch], Coroutine[Any, Any, None]],
        resume: asyncio.Event,
        stopped: Callable[[], bool],
    ):
        self.settings = settings
        self.dataset = dataset
        self.score = score
        self.resume = resume
        self.stopped = stopped
        self.rng = random.Random(settings.seed)
        self.order: list[int] = []
        self.batches: dict[int, StepBatch] = {}
        self.requests: asyncio.Queue[rollout_pb2.GenerateRequest | None] = asyncio.Queue()
        self.version_cond = asyncio.Condition()
        self.first_version = 1
        self.released_version = 0
        self.closed = False
        self.clock = BusyClock()
        self.tasks: list[asyncio.Task] = []

    def start(self, pool: RolloutPool, first_version: int) -> None:
        """Opens the stream; step 1 trains with `first_version` (the one pushed before any rollout)."""
        self.first_version = first_version
        self.tasks = [asyncio.create_task(self.produce()), asyncio.create_task(self.consume(pool))]

    async def release(self, version: int) -> None:
        """Lets the producer start the steps `version` may generate for (after a push and re-admission)."""
        async with self.version_cond:
            self.released_version = version
            self.version_cond.notify_all()

    def batch(self, step: int) -> StepBatch:
        """The samples of `step`, made by whichever asks first (the producer fills it, the loop waits on it)."""
        if step not in self.batches:
            s = self.settings
            batch = StepBatch(step, s.group_size, s.prompts_per_step * s.group_size)
            batch.scoring = asyncio.create_task(self.score(batch))
            self.batches[step] = batch
        return self.batches[step]

    async def scored(self, step: int) -> StepBatch:
        """Waits for `step`'s batch to be generated and scored, and hands it over; a producer or consumer that fails
        meanwhile fails the run with its error."""
        batch = self.batch(step)
        task = batch.scoring
        assert task is not None  # batch() starts it
        while not task.done():
            watched = {task, *(t for t in self.tasks if not t.done() or (not t.cancelled() and t.exception()))}
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            for helper in done - {task}:
                if not helper.cancelled() and helper.exception() is not None:
                    raise helper.exception()  # type: ignore[misc]
        task.result()
        self.batches.pop(step, None)
        return batch

    async def close(self) -> None:
        self.closed = True
        async with self.version_cond:
            self.version_cond.notify_all()
        self.requests.put_nowait(None)
        scoring = [b.scoring for b in self.batches.values() if b.scoring is not None]
        for task in self.tasks + scoring:
            task.cancel()
        await asyncio.gather(*self.tasks, *scoring, return_exceptions=True)
        self.tasks.clear()
        self.batches.clear()

    def generation_metrics(self, batch: StepBatch, t_ready: float, t_end: float) -> dict[str, float]:
        """What the stream did for `batch`, and how long generation overlapped the trainer's [t_ready, t_end]."""
        overlap = self.clock.busy_between(t_ready, t_end)  # generation running while training and syncing
        self.clock.forget_before(t_end)
        return {"overlap_seconds": overlap, "spanning_samples": float(batch.spanning),
                "regenerated_samples": float(batch.regenerated)}  # fmt: skip

    # ---- the producer and the consumer ---------------------------------------------------------------------------

    def next_prompts(self) -> list[int]:
        picked: list[int] = []
        while len(picked) < self.settings.prompts_per_step:
            if not self.order:
                self.order = list(range(len(self.dataset)))
                self.rng.shuffle(self.order)
            picked.append(self.order.pop())
        return picked

    def ended(self) -> bool:
        return self.closed or self.stopped()

    def released_or_ended(self, version: int) -> bool:
        return self.released_version >= version or self.ended()

    async def produce(self) -> None:
        """Submits step s's prompts once the released version is at least the one step s trains with, minus k: with
        max_staleness 0, after the previous step's push; with k, up to k steps ahead of training."""
        for step in range(1, self.settings.max_steps + 1):
            needed = self.first_version + step - 1 - self.settings.max_staleness
            async with self.version_cond:
                await self.version_cond.wait_for(functools.partial(self.released_or_ended, needed))
            await self.resume.wait()
            if self.ended():
                return
            batch = self.batch(step)
            batch.prompts = self.next_prompts()
            batch.started = time.perf_counter()
            sampling = rollout_pb2.SamplingParams(**self.settings.sampling, logprobs=True)
            for k, i in enumerate(batch.prompts):
                self.submit(
                    rollout_pb2.GenerateRequest(
                        request_id=f"s{step}-p{k}", prompt=self.dataset[i]["prompt"], sampling=sampling
                    )
                )

    def submit(self, request: rollout_pb2.GenerateRequest) -> None:
        self.clock.add(request.sampling.num_return_sequences, time.perf_counter())
        self.requests.put_nowait(request)

    async def request_stream(self) -> AsyncIterator[rollout_pb2.GenerateRequest]:
        while (request := await self.requests.get()) is not None:
            yield request

    async def consume(self, pool: RolloutPool) -> None:
        """Reads the run's one Generate stream (through the pool: failover, nothing lost or twice) and hands each
        sample to its step's batch, whose scorer sends it to the reward servers at once."""
        stream = pool.generate(self.request_stream())
        try:
            async for response in stream:
                self.clock.sub(1, time.perf_counter())
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
                    if self.settings.partial_rollout == "regenerate":  # generated again under one version
                        batch.regenerated += 1
                        again = self.regen_request(prompt)
                        again.request_id = f"s{step}-p{k}-j{index}-r{batch.regenerated}"
                        if again.sampling.HasField("seed"):
                            again.sampling.seed += index
                        self.submit(again)
                        continue
                response.sample_index = index
                batch.add(Sample(prompt, response))
        finally:
            await stream.aclose()

    def regen_request(self, prompt_index: int) -> rollout_pb2.GenerateRequest:
        sampling = rollout_pb2.SamplingParams(**self.settings.sampling, logprobs=True)
        sampling.num_return_sequences = 1
        return rollout_pb2.GenerateRequest(prompt=self.dataset[prompt_index]["prompt"], sampling=sampling)
