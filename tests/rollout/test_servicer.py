"""The rollout servicer over the fake engine (tests/rollout/fake_engine.py), served on 127.0.0.1 port 0 in the
test's own event loop and called over gRPC: validation, completion order, abort, sleep states, queue limits and
drain, in milliseconds instead of a vLLM start. tests/rollout/test_server.py checks the same on real vLLM."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import grpc
import pytest

from fabric.errors import error_info
from fabric.rollout.client import GenerateRequest, RolloutClient, SamplingParams
from fabric.rollout.config import RolloutConfig
from fabric.rollout.engine import RolloutEngine
from fabric.rollout.servicer import RolloutServicer
from fabric.server import FabricServer
from fabric.v1 import rollout_pb2, rollout_pb2_grpc
from tests.rollout.fake_engine import FakeEngine


def fake_config(**overrides) -> RolloutConfig:
    values = dict(
        role="actor_infer",
        model="fake",
        model_key="actor_infer.pretrain",
        dtype=None,
        strategy_config={},
        generating_args={"max_new_tokens": 8},
        infer_batch_size=4,
        max_queue_length=4,
        strategy_name="fake",
    )
    values.update(overrides)
    return RolloutConfig(**values)


@asynccontextmanager
async def serving(engine: FakeEngine, grace: float = 1, **config):
    """A RolloutService over `engine` on 127.0.0.1 port 0; yields (server, servicer)."""
    servicer = RolloutServicer(engine, fake_config(**config))
    server = FabricServer(
        ["fabric.v1.RolloutService"],
        lambda s: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, s),
        on_drain=servicer.drain,
    )
    servicer.server_name = server.address
    await engine.start()
    await server.start()
    try:
        yield server, servicer
    finally:
        await server.stop(grace=grace)
        servicer.close()


@asynccontextmanager
async def fake_server(engine: FakeEngine | None = None, **config):
    """A RolloutService over a FakeEngine with a client to it; yields (client, servicer, engine)."""
    engine = engine or FakeEngine()
    async with serving(engine, **config) as (server, servicer), RolloutClient(server.address) as client:
        yield client, servicer, engine


def request(request_id: str, tokens: int = 4, n: int = 1, **sampling) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        prompt="ab",
        sampling=SamplingParams(max_new_tokens=tokens, num_return_sequences=n, **sampling),
    )


async def collect(client, requests):
    return [r async for r in client.generate(requests, timeout=30)]


def test_the_fake_engine_satisfies_the_protocol():
    assert isinstance(FakeEngine(), RolloutEngine)


def test_samples_stream_back_in_completion_order_with_their_version():
    async def go():
        async with fake_server(FakeEngine(token_seconds=0.005)) as (client, _, engine):
            engine.weight_version = 3
            return await collect(client, [request("long", tokens=60), request("short", tokens=2, n=2)])

    responses = asyncio.run(go())
    assert [r.request_id for r in responses] == ["short", "short", "long"]
    assert sorted(r.sample_index for r in responses[:2]) == [0, 1]
    for r in responses:
        assert r.weight_version == 3 and r.finish_reason == rollout_pb2.FINISH_REASON_LENGTH
        assert list(r.prompt_token_ids) == FakeEngine().tokenize("ab") and r.server
    assert len(responses[2].token_ids) == 60 and list(responses[2].logprobs) == [-1.0] * 60


def test_a_bad_request_is_refused_alone_and_the_stream_goes_on():
    async def go():
        async with fake_server() as (client, _, _):
            return await collect(
                client, [request("bad", temperature=5.0), request("dup"), request("dup"), request("good")]
            )

    responses = asyncio.run(go())
    by_id = {}
    for r in responses:
        by_id.setdefault(r.request_id, []).append(r)
    (bad,) = by_id["bad"]
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.error.field == "sampling.temperature" and "[0, 2]" in bad.error.message
    dup_errors = [r for r in by_id["dup"] if r.error.code]
    assert len(dup_errors) == 1 and dup_errors[0].error.reason == "DUPLICATE_REQUEST_ID"
    assert not by_id["good"][0].error.code and len(by_id["good"][0].token_ids) == 4


def test_abort_answers_live_samples_with_finish_reason_abort():
    async def go():
        async with fake_server(FakeEngine(token_seconds=0.01)) as (client, servicer, _):
            stream = asyncio.ensure_future(collect(client, [request("long", tokens=1000, n=2)]))
            while servicer.scheduler.running == 0:
                await asyncio.sleep(0.01)
            aborted = await client.abort(["long", "nobody"])
            with pytest.raises(grpc.aio.AioRpcError) as empty:
                await client.abort([])
            return aborted, await stream, empty.value

    aborted, responses, empty = asyncio.run(go())
    assert aborted == ["long"]
    assert [r.finish_reason for r in responses] == [rollout_pb2.FINISH_REASON_ABORT] * 2
    assert all(len(r.token_ids) < 1000 for r in responses)
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(empty).metadata["field"] == "request_ids"


def test_sleep_refuses_generation_and_wake_up_is_two_step():
    async def go():
        async with fake_server() as (client, _, _):
            out = {}
            with pytest.raises(grpc.aio.AioRpcError) as bad_level:
                await client.sleep(3)
            out["bad_level"] = bad_level.value
            out["slept"] = await client.sleep()
            with pytest.raises(grpc.aio.AioRpcError) as asleep:
                await collect(client, [request("q")])
            out["asleep"] = asleep.value
            with pytest.raises(grpc.aio.AioRpcError) as wrong_order:
                await client.wake_up(["kv_cache"])
            out["wrong_order"] = wrong_order.value
            with pytest.raises(grpc.aio.AioRpcError) as bad_tag:
                await client.wake_up(["gpu"])
            out["bad_tag"] = bad_tag.value
            out["weights"] = await client.wake_up(["weights"])
            out["kv"] = await client.wake_up(["kv_cache"])
            out["after"] = await collect(client, [request("q")])
            return out

    out = asyncio.run(go())
    assert out["bad_level"].code() == grpc.StatusCode.INVALID_ARGUMENT and "1 or 2" in out["bad_level"].details()
    assert out["slept"].state == rollout_pb2.SLEEP_STATE_ASLEEP and out["slept"].level == 1
    assert out["asleep"].code() == grpc.StatusCode.UNAVAILABLE and error_info(out["asleep"]).reason == "ASLEEP"
    assert out["wrong_order"].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(out["wrong_order"]).reason == "WAKE_ORDER"
    assert out["bad_tag"].code() == grpc.StatusCode.INVALID_ARGUMENT and "gpu" in out["bad_tag"].details()
    assert out["weights"].state == rollout_pb2.SLEEP_STATE_WEIGHTS_ONLY
    assert out["kv"].state == rollout_pb2.SLEEP_STATE_AWAKE and len(out["after"]) == 1


def test_a_full_queue_refuses_with_resource_exhausted():
    async def go():
        async with fake_server(FakeEngine(token_seconds=0.01), infer_batch_size=1, max_queue_length=1) as (
            client,
            servicer,
            _,
        ):
            requests = [request(f"q{i}", tokens=50) for i in range(3)]
            responses = await collect(client, requests)
            return responses, servicer.scheduler.running, len(servicer.scheduler.pending)

    responses, running, pending = asyncio.run(go())
    refused = [r for r in responses if r.error.code]
    assert [r.request_id for r in refused] == ["q2"]
    assert refused[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert refused[0].error.reason == "QUEUE_FULL" and "max_queue_length" in refused[0].error.message
    assert sorted(r.request_id for r in responses if not r.error.code) == ["q0", "q1"]
    assert running == 0 and pending == 0


def test_drain_finishes_what_fits_in_the_grace_aborts_the_rest_and_refuses_new_work():
    async def go():
        async with fake_server(FakeEngine(token_seconds=0.01)) as (client, servicer, _):
            stream = asyncio.ensure_future(collect(client, [request("short", tokens=5), request("long", tokens=5000)]))
            while servicer.scheduler.running < 2:
                await asyncio.sleep(0.01)
            await servicer.drain(grace=0.5)
            responses = await stream
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await collect(client, [request("late")])
            return responses, refused.value

    responses, refused = asyncio.run(go())
    reasons = {r.request_id: r.finish_reason for r in responses}
    assert reasons == {"short": rollout_pb2.FINISH_REASON_LENGTH, "long": rollout_pb2.FINISH_REASON_ABORT}
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and error_info(refused).reason == "DRAINING"


def test_domain_errors_become_statuses_in_one_place():
    """Servicers raise FabricError; fabric.server.ErrorInterceptor answers with its code and ErrorInfo, for unary
    and streaming calls alike, and the server goes on."""

    async def go():
        async with fake_server() as (client, _, _):
            channel = client.channel
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.WakeUp(rollout_pb2.WakeUpRequest(tags=["x"]), timeout=5)

            async def no_header():
                yield rollout_pb2.UpdateWeightsRequest()

            with pytest.raises(grpc.aio.AioRpcError) as streaming:
                await stub.UpdateWeights(no_header(), timeout=5)
            info = await client.info()
            return unary.value, streaming.value, info

    unary, streaming, info = asyncio.run(go())
    assert unary.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(unary).metadata["field"] == "tags[0]"
    assert streaming.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(streaming).reason == "MISSING_HEADER"
    assert info.model == "fake"


class _StartClock(FakeEngine):
    """Records when each sample entered the engine (the event loop's clock)."""

    def __init__(self):
        super().__init__(token_seconds=0.001)
        self.starts: list[float] = []

    async def generate(self, engine_id, prompt_token_ids, sampling, index):
        self.starts.append(asyncio.get_running_loop().time())
        return await super().generate(engine_id, prompt_token_ids, sampling, index)


@pytest.mark.parametrize("window", [0.02, 0.0])
def test_a_burst_enters_an_idle_engine_in_one_pass(window):
    """16 requests written 1 ms apart on one stream: with an admission window the idle engine takes them all at
    once (as a caller's gather does in-process), without one they enter one by one as the messages arrive."""

    async def go():
        engine = _StartClock()
        async with fake_server(engine, infer_batch_size=64, max_queue_length=64, admission_window_s=window) as (
            client,
            _,
            _,
        ):

            async def paced():
                for i in range(16):
                    yield request(f"b{i}", tokens=2)
                    await asyncio.sleep(0.001)

            responses = await collect(client, paced())
        return responses, engine.starts

    responses, starts = asyncio.run(go())
    assert sorted(r.request_id for r in responses) == sorted(f"b{i}" for i in range(16))
    spread = max(starts) - min(starts)
    if window:
        assert spread < 0.005, f"the burst entered over {spread * 1000:.1f} ms"
    else:
        assert spread > 0.010, f"without a window the burst entered over {spread * 1000:.1f} ms only"


def test_a_busy_engine_takes_a_new_request_at_once():
    """The window holds only an idle engine's burst: while requests run, a new one enters without waiting."""

    async def go():
        engine = _StartClock()
        async with fake_server(engine, infer_batch_size=8, admission_window_s=0.5) as (client, servicer, _):

            async def two():
                yield request("first", tokens=400)
                while servicer.scheduler.running == 0:
                    await asyncio.sleep(0.01)
                yield request("second", tokens=2)

            loop = asyncio.get_running_loop()
            sent = loop.time()
            responses = await collect(client, two())
        return responses, [t - sent for t in engine.starts]

    responses, starts = asyncio.run(go())
    assert {r.request_id for r in responses} == {"first", "second"}
    assert 0.45 < starts[0] < 2.0  # the idle engine held its first request for the (long) window
    assert starts[1] - starts[0] < 0.3  # the second joined the busy engine at once, not after another window


def test_a_bad_admission_window_is_refused_in_one_line():
    from fabric.config import ConfigError, load_config
    from fabric.rollout.config import load_rollout_config

    for bad in ("-1", "5", "soon"):
        cfg = load_config(
            None,
            [
                "actor_infer.pretrain=/m",
                "actor_infer.strategy_args.strategy_name=vllm",
                f"actor_infer.admission_window_s={bad}",
            ],
        )
        with pytest.raises(
            ConfigError, match=r"actor_infer.admission_window_s'?: expected a number of seconds between 0 and 1"
        ):
            load_rollout_config(cfg, "actor_infer")


def test_generate_batch_answers_as_generate_does_in_fewer_messages():
    """GenerateBatch: the same samples, versions and per-request refusals as Generate, a whole round in one
    request message, and the samples that finished together in one response message."""

    def round_():
        return [request(f"g{i}", tokens=3, n=2) for i in range(12)] + [
            GenerateRequest(request_id="bad", prompt="ab", sampling=SamplingParams(temperature=-1.0)),
        ]

    async def go():
        engine = _StartClock()
        async with fake_server(engine, infer_batch_size=64, max_queue_length=64) as (client, _, _):
            engine.weight_version = 2
            one_by_one = await collect(client, round_())
            engine.starts.clear()
            messages = []
            call = client.stub.GenerateBatch(iter([rollout_pb2.GenerateBatchRequest(requests=round_())]), timeout=30)
            async for message in call:
                messages.append(list(message.responses))
            starts = list(engine.starts)
            flat = [r async for r in client.generate_batch(round_(), timeout=30, per_message=5)]
        return one_by_one, messages, flat, starts

    one_by_one, messages, flat, starts = asyncio.run(go())

    def key(responses):
        return sorted(
            (r.request_id, r.sample_index, list(r.token_ids), r.weight_version, r.error.reason) for r in responses
        )

    batched = [r for m in messages for r in m]
    assert key(batched) == key(one_by_one) == key(flat)
    assert len(batched) == 25 and [r.error.reason for r in batched if r.request_id == "bad"] == ["INVALID_FIELD"]
    assert max(starts) - min(starts) < 0.005  # the round entered the engine in one pass
    assert len(messages) <= 3, [len(m) for m in messages]  # the refusal, then the 24 samples finished together
