"""`fabric run` end to end on the embedded default (shortened): the launcher, 2 rollout servers, 1 reward server
and the megatron-core trainer as separate processes. While it runs, the test steers the trainer over
fabric.v1.TrainerService (pause, checkpoint, resume), then SIGKILLs one rollout server: the run must carry on and
end cleanly, leaving no process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from fabric import cli
from fabric.config import ConfigError
from fabric.run import launcher
from fabric.shm import descendant_pids
from fabric.trainer import server as trainer_server
from fabric.v1 import rollout_pb2, rollout_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tests.references import hf_greedy

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
STEPS = 6  # pause at step 2+, kill after resume: the steps left show the run carrying on with one server
# 4 x 4 = 16 samples a step: one mini-batch of 16 (the demo's 64 x 4 is for its 256)
OVERRIDES = [f"max_steps={STEPS}", "rollout_batch_size=4", "num_return_sequences_in_group=4", "sft_warmup.steps=10",
             "task.max_operand=9", "actor_train.training_args.per_device_train_batch_size=16",
             "actor_train.training_args.gradient_accumulation_steps=1"]  # fmt: skip


class Run:
    def __init__(self, out: Path, *overrides: str):
        self.out = out
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fabric.cli", "run", f"output_dir={out}", *OVERRIDES, *overrides],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
        self.started: set[tuple[int, str]] = set()  # (pid, start time): every process seen below the launcher
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._note_processes, daemon=True).start()

    def _note_processes(self):
        while self.proc.poll() is None:
            self.started |= {(pid, start) for pid in descendant_pids(self.proc.pid) if (start := _start_time(pid))}
            time.sleep(0.5)

    def left_behind(self) -> list[int]:
        return [pid for pid, start in self.started if _start_time(pid) == start]

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 400) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines[-40:]))

    def steps_done(self) -> int:
        path = self.out / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def greedy(address: str, prompts: list[str]) -> list[list[int]]:
    with grpc.insecure_channel(address) as channel:
        requests = [rollout_pb2.GenerateRequest(request_id=str(i), prompt=p, sampling=rollout_pb2.SamplingParams(
            max_new_tokens=8, temperature=0, num_return_sequences=1)) for i, p in enumerate(prompts)]  # fmt: skip
        out = {r.request_id: list(r.token_ids) for r in rollout_pb2_grpc.RolloutServiceStub(channel).Generate(
            iter(requests), timeout=60)}  # fmt: skip
    return [out[str(i)] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = Run(tmp_path_factory.mktemp("run") / "out")
    yield run
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGINT)
        run.proc.wait(timeout=60)


def test_run_is_steered_survives_a_dead_rollout_server_and_cleans_up(run):
    servers = {m[0]: (m[1], int(m[2])) for m in re.findall(r"^\s+(\S+-\d)\s+(\S+:\d+)\s+pid (\d+)", run.text, re.M)}
    trainer_address = run.wait_for(r"^trainer: (\S+:\d+)").group(1)
    servers = {m[0]: (m[1], int(m[2])) for m in re.findall(r"^\s+(\S+-\d)\s+(\S+:\d+)\s+pid (\d+)", run.text, re.M)}
    assert set(servers) == {"rollout-0", "rollout-1", "reward-0"}, run.text
    # trainer_start auto on a host without CUDA: the trainer starts once the servers are ready (beside them it would
    # share the cores) and reads their addresses from servers.json
    lines = run.text.splitlines()
    assert not any(line.startswith("trainer loading its policy while") for line in lines), run.text
    rollout, reward = [servers["rollout-0"][0], servers["rollout-1"][0]], [servers["reward-0"][0]]
    assert json.loads((run.out / "servers.json").read_text()) == {"rollout": rollout, "reward": reward}

    with grpc.insecure_channel(trainer_address) as channel:
        trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
        deadline = time.monotonic() + 300
        while run.steps_done() < 2:
            assert time.monotonic() < deadline and run.proc.poll() is None, run.text[-3000:]
            time.sleep(0.2)
        # Pause: the step in flight finishes, then nothing moves; a checkpoint then matches the serving weights.
        assert trainer.Pause(trainer_pb2.PauseRequest(), timeout=10).state == trainer_pb2.TRAINER_STATE_PAUSED
        time.sleep(3)
        paused_at = trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
        time.sleep(2)
        assert trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10).step == paused_at.step
        saved = trainer.SaveCheckpoint(trainer_pb2.SaveCheckpointRequest(path=str(run.out / "paused")), timeout=60)
        assert saved.weight_version == paused_at.weight_version and saved.step == paused_at.step
        prompts = ["Add 3 and 4.\n", "Add 9 and 9.\n", "Add 0 and 5.\n"]
        serving = servers["rollout-0"][0]
        assert greedy(serving, prompts) == hf_greedy(saved.path, prompts, 8)  # the checkpoint is the trained policy
        base = hf_greedy(str(run.out / "base_model"), prompts, 8)
        assert hf_greedy(saved.path, prompts, 8) != base
        # WatchMetrics replays what happened so far
        replay = trainer.WatchMetrics(trainer_pb2.WatchMetricsRequest(since_step=1), timeout=10)
        first = next(iter(replay))
        assert first.metrics.step == 1 and first.metrics.samples == 16
        replay.cancel()
        assert trainer.Resume(trainer_pb2.ResumeRequest(), timeout=10).state == trainer_pb2.TRAINER_STATE_RUNNING

        # Kill one rollout server mid-run: the trainer carries on with the other.
        killed_at = run.steps_done()
        os.killpg(servers["rollout-1"][1], signal.SIGKILL)
        run.wait_for(r"rollout-1 .*died with exit code -9")
        run.wait_for(r"the trainer carries on with 1 rollout server")
    assert run.proc.wait(timeout=400) == 0, run.text[-3000:]
    assert killed_at < STEPS

    rows = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["weight_version"] for r in rows] == list(range(2, STEPS + 2))  # version 1 is the initial push
    assert all(r["samples"] == 16 and r["stale_samples"] == 0 for r in rows)  # every sample, none stale
    assert all(r["logprob_mismatch"] < 1e-3 for r in rows)  # vLLM and megatron agree on the pushed weights
    assert rows[-1]["extra"]["rollout_servers_alive"] == 1.0
    assert (run.out / "metrics.png").stat().st_size > 10_000
    final = run.out / "checkpoints" / "final"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    assert re.search(rf"done in \d+ s: {STEPS} steps; mean reward of the first 5 steps [\d.]+, of the last 5", run.text)

    # nothing left behind: the launcher returned once every process it started was gone
    for _, pid in servers.values():
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert len(run.started) > 4 and run.left_behind() == []


@pytest.mark.parametrize(
    "override, message",
    [
        ("max_step=3", "config key 'max_step': unknown key; did you mean 'max_steps'?"),
        ("actor_infer.strategy_args.strategy_config.block_size=16", "block_size': 16 is not supported"),
        ("actor_infer.strategy_args.strategy_config.blok_size=32", "did you mean 'block_size'?"),
        ("rewards.answer_tag.worker_cls=nope", "unknown scorer 'nope'"),
        ("actor_infer.strategy_args.strategy_name=sglang", "strategy_name"),
        ("cluster.trainer_start=first", "cluster.trainer_start': 'first': use auto, with_servers, after_servers"),
    ],
)
def test_config_mistakes_are_one_clear_line(tmp_path, capsys, override, message):
    code, stdout, stderr = fabric_run(capsys, f"output_dir={tmp_path}", override)
    output = stdout + stderr
    assert code == 2
    last = output.strip().splitlines()[-1]
    assert last.startswith("fabric: config key") and message in last, output
    assert "Traceback" not in output


def test_a_missing_model_is_one_clear_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    text = (ROOT / "examples" / "default.yaml").read_text()
    text = re.sub(r"(?ms)^task:.*?\n\n", "", text).replace("${task.model_dir}", str(tmp_path / "no-model"))
    text = text.replace('"${task.dataset}"', str(tmp_path / "data.jsonl"))
    config.write_text(text)
    code, stdout, stderr = fabric_run(capsys, "--config", str(config), f"output_dir={tmp_path}")
    assert code == 2, stdout + stderr
    assert "config key 'actor_train.pretrain': not an HF model directory" in stderr.strip().splitlines()[-1]


def fabric_run(capsys, *args: str) -> tuple[int, str, str]:
    """`fabric run ARGS` in this process (a config refused before anything starts): exit code, stdout, stderr. In
    process, as the CLI's entry point calls it, to spare each case the ~10 s import of vLLM and megatron."""
    code = cli.main(["run", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "mode, cuda, train, infer, rewards, alongside",
    [
        ("auto", False, set(), set(), set(), False),  # CPU: they would share its cores
        ("with_servers", False, set(), set(), set(), True),
        ("auto", True, set(), set(), set(), False),  # no device_mapping: every role on every visible GPU
        ("auto", True, {0}, {0}, set(), False),  # colocated
        ("auto", True, {0}, set(), set(), False),  # actor_infer on every GPU, GPU 0 among them
        ("auto", True, {0}, {1}, set(), True),  # separate GPUs
        ("after_servers", True, {0}, {1}, set(), False),
        ("auto", True, {0}, {1}, {0}, False),  # a reward model on the trainer's GPU
        ("auto", True, {0, 1}, {2, 3}, {4}, True),
    ],
)
def test_the_trainer_loads_beside_the_servers_only_where_they_share_no_gpu(
    mode, cuda, train, infer, rewards, alongside
):
    assert launcher.loads_alongside(mode, cuda, train, infer, rewards) is alongside


def test_a_trainer_forced_beside_servers_on_their_gpu_is_refused():
    with pytest.raises(ConfigError, match="cluster.trainer_start.*share a GPU with a server"):
        launcher.loads_alongside("with_servers", True, {0}, {0}, set())


@pytest.mark.parametrize(
    "devices, cuda, waves",
    [
        ([None, None], False, [[0, 1]]),  # CPU: all at once
        ([None, None], True, [[0], [1]]),  # the one-GPU demo: each engine sees every GPU
        (["0"], True, [[0]]),
        (["1", "2", "1", "2"], True, [[0, 1], [2, 3]]),  # one engine per GPU at a time
        (["0", "1", "2"], True, [[0, 1, 2]]),
    ],
)
def test_engines_sharing_a_gpu_start_one_after_another(devices, cuda, waves):
    assert launcher.start_waves(devices, cuda) == waves


def test_the_trainer_waits_for_the_servers_file_and_gives_up_with_a_clear_line(tmp_path):
    path = tmp_path / "servers.json"

    async def written_later():
        async def write():
            await asyncio.sleep(0.3)
            path.write_text(json.dumps({"rollout": ["a:1", "b:2"], "reward": ["c:3"]}))

        writer = asyncio.ensure_future(write())
        addresses = await trainer_server.addresses_from_file(path, timeout=10)
        await writer
        return addresses

    assert asyncio.run(written_later()) == (["a:1", "b:2"], ["c:3"])
    with pytest.raises(TimeoutError, match=r"no server addresses in .*missing.json after 0 s"):
        asyncio.run(trainer_server.addresses_from_file(tmp_path / "missing.json", timeout=0.2))
