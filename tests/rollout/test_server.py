"""The rollout server as users run it: `fabric serve rollout` on the tiny model (one subprocess for the module),
called over gRPC with fabric.rollout.client. The last test SIGTERMs that server and checks the drain."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import grpc
import pytest

from fabric.errors import error_info
from fabric.rollout.client import GenerateRequest, RolloutClient, SamplingParams
from fabric.v1 import rollout_pb2
from tests.references import hf_greedy
from tests.rollout.configs import write_config
from tests.servers import serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

INFER_BATCH_SIZE = 4
MAX_QUEUE_LENGTH = 4
MAX_MODEL_LEN = 512  # the tiny model's max_position_embeddings
# Sampled with this seed, the long prompt below runs to max_new_tokens on the tiny model (no early EOS): checked
# by test_long_request_runs_to_length, which the timing-free ordering tests rely on.
LONG_SEED = 6
LONG_PROMPT = "Add 12 and 30.\n"
LONG_TOKENS = 480  # ~1 s of decoding here: the windows the abort and ordering tests act in


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    config = write_config(
        tmp_path_factory.mktemp("rollout") / "rollout.yaml",
        tiny_model,
        infer_batch_size=INFER_BATCH_SIZE,
        max_queue_length=MAX_QUEUE_LENGTH,
        drain_grace_s=60,
        strategy_config={"max_model_len": MAX_MODEL_LEN},
    )
    server = serve("rollout", config)
    yield server
    server.stop(grace=60)


def run(coro):
    return asyncio.run(coro)


def long_request(request_id: str) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        prompt=LONG_PROMPT,
        sampling=SamplingParams(max_new_tokens=LONG_TOKENS, temperature=1.0, seed=LONG_SEED, num_return_sequences=1),
    )


def greedy_request(request_id: str, prompt: str, max_new_tokens: int = 16) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        prompt=prompt,
        sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, num_return_sequences=1),
    )


async def collect(client: RolloutClient, requests) -> list[rollout_pb2.GenerateResponse]:
    return [response async for response in client.generate(requests, timeout=300)]


async def wait_for(client: RolloutClient, predicate, timeout: float = 60.0):
    """Polls GetServerInfo until predicate(info) holds; returns that info."""
    deadline = time.monotonic() + timeout
    while True:
        info = await client.info()
        if predicate(info) or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.02)


async def idle(client: RolloutClient) -> rollout_pb2.RolloutServiceGetServerInfoResponse:
    return await wait_for(client, lambda i: i.running_requests == 0 and i.queue_depth == 0)


def test_health_reflection_and_server_info(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="fabric.v1.RolloutService"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert "fabric.v1.RolloutService" in {s.name for s in reply.list_services_response.service}

    async def go():
        async with RolloutClient(server.address) as client:
            return await client.info()

    info = run(go())
    assert info.model.endswith("model") and info.server == server.address
    assert info.weight_version == 0 and info.sleep_state == rollout_pb2.SLEEP_STATE_AWAKE
    assert info.max_model_len == MAX_MODEL_LEN and info.infer_batch_size == INFER_BATCH_SIZE
    assert info.vocab_size >= 320 and info.engine_version.startswith("vllm")
    assert '"block_size": 32' in info.engine_config_json and '"fabric_shm"' in info.engine_config_json
    assert '"disable_log_stats": true' in info.engine_config_json  # as vLLM's offline LLM: no per-step stats
    assert '"max_new_tokens": 16' in info.generating_args_json


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_the_server_and_its_vllm_processes_take_a_short_gil_switch_interval(server):
    """The rollout server's engine processes inherit FABRIC_GIL_SWITCH_S (the fabric's vLLM plugin applies it
    there, as the server does to itself): 0.5 ms, not Python's 5 ms."""
    from fabric.rollout.vllm.transfer import DEFAULT_GIL_SWITCH_S, GIL_SWITCH_ENV

    children = _children(server.process.pid)
    assert children, "the rollout server started no engine process"
    environs = [Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in children]
    assert any(f"{GIL_SWITCH_ENV}={DEFAULT_GIL_SWITCH_S}".encode() in env for env in environs)


def test_a_bad_gil_switch_interval_is_refused_in_one_line(monkeypatch):
    import sys

    from fabric.rollout.vllm.transfer import GIL_SWITCH_ENV, apply_gil_switch_interval

    before = sys.getswitchinterval()
    try:
        monkeypatch.setenv(GIL_SWITCH_ENV, "0.002")
        apply_gil_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(0.002)
        for bad in ("fast", "0", "-1"):
            monkeypatch.setenv(GIL_SWITCH_ENV, bad)
            with pytest.raises(ValueError, match=f"{GIL_SWITCH_ENV}='{bad}': give the GIL switch interval in seconds"):
                apply_gil_switch_interval()
    finally:
        sys.setswitchinterval(before)


def test_n_samples_per_request_with_indices(server):
    prompts = {f"q{i}": f"Add {i} and {i + 1}.\n" for i in range(3)}
    requests = [
        GenerateRequest(request_id=rid, prompt=p, sampling=SamplingParams(num_return_sequences=3, max_new_tokens=8))
        for rid, p in prompts.items()
    ]

    async def go():
        async with RolloutClient(server.address) as client:
            return await collect(client, requests)

    responses = run(go())
    assert len(responses) == 9
    for rid in prompts:
        mine = [r for r in responses if r.request_id == rid]
        assert sorted(r.sample_index for r in mine) == [0, 1, 2]
        for r in mine:
            assert not r.HasField("error")
            assert 1 <= len(r.token_ids) <= 8 and len(r.logprobs) == len(r.token_ids)
            assert r.finish_reason in (rollout_pb2.FINISH_REASON_LENGTH, rollout_pb2.FINISH_REASON_STOP)
            assert r.weight_version == 0 and r.server == server.address
            assert len(r.prompt_token_ids) > 0 and r.text
        assert len({tuple(r.token_ids) for r in mine}) > 1, "three samples at temperature 1 should differ"


def test_text_decoded_at_the_end_equals_vllms_own_detokenizer(server):
    """Without stop strings the server decodes each sample's text once at the end (vLLM's per-step detokenizing is
    off); with one, vLLM detokenizes as it generates. The same seeded samples, both ways: the same tokens and the
    same text, for samples that end on EOS (the stop token left out of the text) and at max_new_tokens."""

    def requests(tag: str, stop: list[str]):
        return [
            GenerateRequest(
                request_id=f"{tag}{seed}",
                prompt="Add 3 and 4.\n",
                sampling=SamplingParams(max_new_tokens=200, temperature=1.0, seed=seed, stop=stop),
            )
            for seed in range(8)  # the queue takes 8 at once (infer_batch_size + max_queue_length)
        ]

    async def go():
        async with RolloutClient(server.address) as client:
            plain = await collect(client, requests("p", []))
            detok = await collect(client, requests("d", ["never appears \x01"]))
            return {r.request_id[1:]: r for r in plain}, {r.request_id[1:]: r for r in detok}

    plain, detok = run(go())
    reasons = set()
    for seed, ours in plain.items():
        theirs = detok[seed]
        assert list(ours.token_ids) == list(theirs.token_ids), seed
        assert ours.finish_reason == theirs.finish_reason, seed
        assert ours.text == theirs.text, (seed, ours.text, theirs.text)
        reasons.add(ours.finish_reason)
    assert reasons == {rollout_pb2.FINISH_REASON_STOP, rollout_pb2.FINISH_REASON_LENGTH}, reasons


def test_long_request_runs_to_length(server):
    """Precondition of the ordering and abort tests: the long request does not stop early."""

    async def go():
        async with RolloutClient(server.address) as client:
            return await collect(client, [long_request("long")])

    (response,) = run(go())
    assert response.finish_reason == rollout_pb2.FINISH_REASON_LENGTH
    assert len(response.token_ids) == LONG_TOKENS


def test_greedy_equals_transformers_float32_greedy_and_logprobs_match(server, tiny_model):
    """vLLM's float32 greedy equals transformers' on this model, so the served tokens must equal HF's, and each
    logprob must be log softmax of HF's logits at the sampled token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["Add 3 and 4.\n", "Add 40 and 9.\n", "Add 17 and 25.\n"]

    async def go():
        async with RolloutClient(server.address) as client:
            requests = [greedy_request(f"g{i}", p) for i, p in enumerate(prompts)]
            by_text = {r.request_id: r for r in await collect(client, requests)}
            # The same prompts as token ids answer identically.
            ids = [list(by_text[f"g{i}"].prompt_token_ids) for i in range(len(prompts))]
            by_ids = [
                GenerateRequest(request_id=f"t{i}", prompt_token_ids=ids[i], sampling=requests[i].sampling)
                for i in range(len(prompts))
            ]
            return by_text, {r.request_id: r for r in await collect(client, by_ids)}

    by_text, by_ids = run(go())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for i, prompt in enumerate(prompts):
        served = by_text[f"g{i}"]
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert list(served.prompt_token_ids) == prompt_ids
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False)
        expected = out[0, len(prompt_ids) :].tolist()
        assert list(served.token_ids) == expected, prompt
        assert list(by_ids[f"t{i}"].token_ids) == expected
        assert served.text == tokenizer.decode(expected, skip_special_tokens=True)

        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + expected])).logits[0, len(prompt_ids) - 1 : -1]
        hf_logprobs = torch.log_softmax(logits, dim=-1)[torch.arange(len(expected)), torch.tensor(expected)]
        assert all(math.isfinite(x) and x <= 0 for x in served.logprobs)
        assert served.logprobs == pytest.approx(hf_logprobs.tolist(), abs=1e-3)


def test_logprobs_can_be_turned_off(server):
    request = greedy_request("nolp", "Add 1 and 1.\n")
    request.sampling.logprobs = False

    async def go():
        async with RolloutClient(server.address) as client:
            return await collect(client, [request])

    (response,) = run(go())
    assert len(response.token_ids) > 0 and len(response.logprobs) == 0


def test_samples_stream_back_before_the_slowest_request_is_done(server):
    """Completion order, not request order: short requests sent after a long one come back while it still runs."""
    short = [greedy_request(f"short{i}", f"Add {i} and 2.\n", max_new_tokens=2) for i in range(4)]

    async def go():
        async with RolloutClient(server.address) as client:
            order, running_when_short_arrived = [], []
            async for response in client.generate([long_request("long"), *short], timeout=300):
                order.append(response.request_id)
                if response.request_id.startswith("short"):
                    running_when_short_arrived.append((await client.info()).running_requests)
                else:
                    long_response = response
            return order, running_when_short_arrived, long_response

    order, running, long_response = run(go())
    assert order[-1] == "long" and sorted(order[:-1]) == [f"short{i}" for i in range(4)]
    assert long_response.finish_reason == rollout_pb2.FINISH_REASON_LENGTH
    assert running[0] >= 1, "the long request was still in the engine when the first short one came back"


def test_abort_running_and_queued_requests(server):
    """infer_batch_size 4: four long requests run, two wait; aborting answers every sample with finish reason
    abort (the running ones with their tokens so far, the queued ones with none) and leaves nothing running."""
    requests = [long_request(f"a{i}") for i in range(6)]

    async def go():
        async with RolloutClient(server.address) as client:
            responses = []

            async def consume():
                async for response in client.generate(requests, timeout=300):
                    responses.append(response)

            with pytest.raises(grpc.aio.AioRpcError) as empty:
                await client.abort([])
            consumer = asyncio.create_task(consume())
            busy = await wait_for(client, lambda i: i.running_requests == INFER_BATCH_SIZE and i.queue_depth == 2)
            aborted = await client.abort(["a5", "a0", "nope"])  # a5 is queued, a0 is running
            rest = await client.abort([f"a{i}" for i in range(1, 5)])
            await asyncio.wait_for(consumer, 120)
            return busy, aborted, empty.value, rest, responses, await idle(client)

    busy, aborted, empty, rest, responses, after = run(go())
    assert busy.running_requests == INFER_BATCH_SIZE and busy.queue_depth == 2
    assert sorted(aborted) == ["a0", "a5"]
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_ids" in empty.details()
    assert error_info(empty).metadata["field"] == "request_ids"
    assert sorted(rest) == ["a1", "a2", "a3", "a4"]
    by_id = {r.request_id: r for r in responses}
    assert sorted(by_id) == [f"a{i}" for i in range(6)]
    assert all(r.finish_reason == rollout_pb2.FINISH_REASON_ABORT for r in responses)
    assert by_id["a5"].token_ids == [] and len(by_id["a0"].token_ids) < LONG_TOKENS
    assert after.running_requests == 0 and after.queue_depth == 0


def test_cancelled_stream_aborts_its_requests(server):
    """A client that goes away leaves no work behind: running and queued requests are aborted in the engine."""

    async def go():
        async with RolloutClient(server.address) as client:
            call = client.stub.Generate(iter([long_request(f"c{i}") for i in range(6)]))
            busy = await wait_for(client, lambda i: i.running_requests == INFER_BATCH_SIZE and i.queue_depth == 2)
            call.cancel()
            after = await idle(client)
            # The server keeps serving.
            (response,) = await collect(client, [greedy_request("after", "Add 2 and 2.\n")])
            return busy, after, response

    busy, after, response = run(go())
    assert busy.running_requests == INFER_BATCH_SIZE
    assert after.running_requests == 0 and after.queue_depth == 0
    assert len(response.token_ids) > 0 and not response.HasField("error")


BAD_REQUESTS = [
    # (request, field named in the error)
    (GenerateRequest(request_id="empty"), "prompt"),
    (GenerateRequest(request_id="both", prompt="Add 1 and 2.\n", prompt_token_ids=[5, 6]), "prompt"),
    (GenerateRequest(request_id="oov", prompt_token_ids=[5, 10**6]), "prompt_token_ids[1]"),
    (GenerateRequest(request_id="negative", prompt_token_ids=[-3]), "prompt_token_ids[0]"),
    (GenerateRequest(request_id="too-long", prompt_token_ids=[5] * MAX_MODEL_LEN), "prompt_token_ids"),
    (GenerateRequest(request_id="temp", prompt="x", sampling=SamplingParams(temperature=-0.5)), "sampling.temperature"),
    (GenerateRequest(request_id="top-p-0", prompt="x", sampling=SamplingParams(top_p=0.0)), "sampling.top_p"),
    (GenerateRequest(request_id="top-p-big", prompt="x", sampling=SamplingParams(top_p=1.5)), "sampling.top_p"),
    (GenerateRequest(request_id="n0", prompt="x", sampling=SamplingParams(num_return_sequences=0)),
     "sampling.num_return_sequences"),
    (GenerateRequest(request_id="mnt0", prompt="x", sampling=SamplingParams(max_new_tokens=0)),
     "sampling.max_new_tokens"),
    (GenerateRequest(request_id="mnt-big", prompt="x", sampling=SamplingParams(max_new_tokens=MAX_MODEL_LEN)),
     "sampling.max_new_tokens"),
    (GenerateRequest(request_id="beams", prompt="x", sampling=SamplingParams(num_beams=4)), "sampling.num_beams"),
    (GenerateRequest(request_id="", prompt="x"), "request_id"),
]  # fmt: skip


def test_every_bad_input_gets_invalid_argument_and_the_stream_goes_on(server):
    good = greedy_request("good", "Add 5 and 6.\n", max_new_tokens=4)
    duplicate = long_request("dup")  # live while its twin arrives right behind it

    async def go():
        async with RolloutClient(server.address) as client:
            stream = [duplicate, long_request("dup"), *(r for r, _ in BAD_REQUESTS), good]
            responses = []
            async for response in client.generate(stream, timeout=300):
                responses.append(response)
                if response.request_id == "good":
                    await client.abort(["dup"])  # done checking: no need to wait for the long one
            return responses, await idle(client)

    responses, after = run(go())
    errors = [r for r in responses if r.HasField("error")]
    expected = [("dup", "request_id")] + [(r.request_id, f) for r, f in BAD_REQUESTS]
    assert [(r.request_id, r.error.field) for r in errors] == expected
    for r in errors:
        assert r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert r.error.message.startswith(r.error.field + ":"), r.error.message
    assert "beam search is not supported" in next(r for r in errors if r.request_id == "beams").error.message
    served = {(r.request_id, r.sample_index) for r in responses if not r.HasField("error")}
    assert served == {("dup", 0), ("good", 0)}
    assert after.running_requests == 0


def test_full_queue_refuses_with_resource_exhausted(server):
    """4 running + 4 queued (max_queue_length 4): the ninth request is refused; the others are unharmed."""
    requests = [long_request(f"f{i}") for i in range(INFER_BATCH_SIZE + MAX_QUEUE_LENGTH + 1)]

    async def go():
        async with RolloutClient(server.address) as client:
            responses = []
            async for response in client.generate(requests, timeout=300):
                responses.append(response)
                if response.HasField("error"):
                    await client.abort([r.request_id for r in requests])
            return responses, await idle(client)

    responses, after = run(go())
    errors = [r for r in responses if r.HasField("error")]
    assert [r.request_id for r in errors] == ["f8"]
    assert errors[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert errors[0].error.reason == "QUEUE_FULL"
    assert sorted(r.request_id for r in responses if not r.HasField("error")) == [f"f{i}" for i in range(8)]
    assert after.running_requests == 0 and after.queue_depth == 0


def test_sleep_wake_round_trip(server):
    probe = greedy_request("probe", "Add 8 and 9.\n")

    async def go():
        async with RolloutClient(server.address) as client:
            (before,) = await collect(client, [probe])
            # A request in flight when the server falls asleep is answered with finish reason abort.
            responses = []

            async def consume():
                async for response in client.generate([long_request("inflight")], timeout=300):
                    responses.append(response)

            consumer = asyncio.create_task(consume())
            await wait_for(client, lambda i: i.running_requests == 1)
            slept = await client.sleep()
            await asyncio.wait_for(consumer, 60)
            asleep_info = await client.info()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await collect(client, [probe])
            with pytest.raises(grpc.aio.AioRpcError) as wrong_order:
                await client.wake_up(["kv_cache"])
            with pytest.raises(grpc.aio.AioRpcError) as bad_tag:
                await client.wake_up(["gpu"])
            with pytest.raises(grpc.aio.AioRpcError) as bad_level:
                await client.sleep(3)
            weights = await client.wake_up(["weights"])
            with pytest.raises(grpc.aio.AioRpcError) as still_refused:
                await collect(client, [probe])
            kv = await client.wake_up(["kv_cache"])
            (after,) = await collect(client, [probe])
            again = await client.sleep(2), await client.wake_up([])
            return (before, responses, slept, asleep_info, refused.value, wrong_order.value, bad_tag.value,
                    bad_level.value, weights, still_refused.value, kv, after, again)  # fmt: skip

    (before, inflight, slept, asleep_info, refused, wrong_order, bad_tag, bad_level, weights, still_refused, kv,
     after, again) = run(go())  # fmt: skip
    assert [r.finish_reason for r in inflight] == [rollout_pb2.FINISH_REASON_ABORT]
    assert slept.state == rollout_pb2.SLEEP_STATE_ASLEEP and slept.level == 1  # 0 takes the configured sleep_level
    assert asleep_info.sleep_state == rollout_pb2.SLEEP_STATE_ASLEEP and asleep_info.sleep_level == 1
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "asleep" in refused.details()
    assert wrong_order.code() == grpc.StatusCode.FAILED_PRECONDITION and "weights" in wrong_order.details()
    assert bad_tag.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(bad_tag).metadata["field"] == "tags[0]"
    assert bad_level.code() == grpc.StatusCode.INVALID_ARGUMENT and "level" in bad_level.details()
    assert weights.state == rollout_pb2.SLEEP_STATE_WEIGHTS_ONLY
    assert still_refused.code() == grpc.StatusCode.UNAVAILABLE
    assert kv.state == rollout_pb2.SLEEP_STATE_AWAKE
    assert list(after.token_ids) == list(before.token_ids)
    assert again[0].state == rollout_pb2.SLEEP_STATE_ASLEEP and again[0].level == 2
    assert again[1].state == rollout_pb2.SLEEP_STATE_AWAKE


def test_weight_updates_reach_the_engine_and_samples_carry_the_version(server, tiny_model, tiny_model_b):
    """UpdateWeights goes through the servicer to the weight receiver and the engine adapter's commit: after
    version 1 (checkpoint b) greedy output is checkpoint b's, after version 2 (a again) it is a's, and every sample
    says which version made it."""
    import torch

    from fabric.weights.sender import WeightSource, push_weights

    prompt = "Add 21 and 4.\n"

    async def go():
        async with RolloutClient(server.address) as client:
            results = []
            for version, checkpoint in ((1, tiny_model_b), (2, tiny_model)):
                source = WeightSource.from_hf_checkpoint(checkpoint, 1 << 20, torch.float32)
                report = await push_weights(source, [server.address], version=version)
                (sample,) = await collect(client, [greedy_request(f"v{version}", prompt)])
                results.append((report, sample, (await client.info()).weight_version))
            return results

    expected = {1: hf_greedy(tiny_model_b, [prompt], 16)[0], 2: hf_greedy(tiny_model, [prompt], 16)[0]}
    assert expected[1] != expected[2]
    for version, (report, sample, serving) in enumerate(run(go()), start=1):
        assert report.ok and report.results[0].committed, report
        assert sample.weight_version == version and serving == version
        assert list(sample.token_ids) == expected[version]


def test_sigterm_drains_running_requests_and_exits_0(server):
    """Runs last (it stops the module's server): a running request finishes, new work is refused, exit code 0."""

    async def go():
        async with RolloutClient(server.address) as client:
            responses = []

            async def consume():
                async for response in client.generate([long_request("last")], timeout=300):
                    responses.append(response)

            consumer = asyncio.create_task(consume())
            await wait_for(client, lambda i: i.running_requests == 1)
            server.proc.send_signal(15)
            await asyncio.sleep(0.3)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await collect(client, [greedy_request("late", "Add 1 and 2.\n")])
            await asyncio.wait_for(consumer, 120)
            return responses, refused.value

    responses, refused = run(go())
    assert [(r.request_id, r.finish_reason) for r in responses] == [("last", rollout_pb2.FINISH_REASON_LENGTH)]
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert server.proc.wait(60) == 0, server.last_lines()
    assert any("draining" in line for line in server.tail)
