"""Fuzz every RPC of a real rollout server and a real reward server with generated malformed and hostile input
(hypothesis over the proto message classes, plus garbage bytes that are not a valid serialized message).

Every answer must be OK or a status other than UNKNOWN / INTERNAL with a message; per-item errors inside streams
likewise. Afterwards both servers still answer health SERVING and a good request. Calls stay cheap (a few new
tokens) so that thousands of them fit in well under a minute.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.errors import error_info
from fabric.v1 import reward_pb2, reward_pb2_grpc, rollout_pb2, rollout_pb2_grpc, weights_pb2
from fabric.weights.sender import WeightSource, push_weights

from .conftest import MAX_NEW, greedy, weights_status

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FUZZ = settings(
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)


BAD_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
CALLS: Counter[str] = Counter()  # requests sent, by RPC
FAILURES: list[str] = []  # status errors without google.rpc ErrorInfo details
ECHO_OVERFLOW: list[str] = []  # error messages too large for the trailers (fabric.errors caps them)

INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-1, 0, 1, 2**31 - 1, -(2**31)]))
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-1, 0, 1, 2**63 - 1]))
FLOAT = st.floats(width=32, allow_nan=True, allow_infinity=True)
TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.sampled_from(["", " ", "\n", "\x00", "<answer>", "\\boxed{", "$" * 50, "Add 3 and 4.\n", "😀" * 20]),
    st.integers(1000, 5000).map(lambda n: "Add 1 and 2. " * n),  # longer than max_model_len
)


# Valid values small (cheap calls; unset max_new_tokens takes the server's default of 8), invalid ones of every kind.
MAX_NEW_TOKENS = st.one_of(st.integers(-(2**31), 0), st.integers(1, 4), st.integers(250, 2**31 - 1))
NUM_RETURN_SEQUENCES = st.one_of(st.integers(-(2**31), 0), st.integers(1, 3), st.integers(1025, 2**31 - 1))


def optional(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def sampling_params(draw):
    values = {
        "max_new_tokens": optional(MAX_NEW_TOKENS),
        "temperature": optional(FLOAT),
        "top_p": optional(FLOAT),
        "top_k": optional(INT32),
        "num_beams": optional(st.one_of(INT32, st.just(1))),
        "num_return_sequences": optional(NUM_RETURN_SEQUENCES),
        "seed": optional(INT64),
        "logprobs": optional(st.booleans()),
        "repetition_penalty": optional(FLOAT),
    }  # fmt: skip
    params = rollout_pb2.SamplingParams(**{k: v for k, v in ((k, draw(s)) for k, s in values.items()) if v is not None})
    params.stop.extend(draw(st.lists(TEXT, max_size=3)))
    return params


@st.composite
def generate_requests(draw):
    request = rollout_pb2.GenerateRequest(request_id=draw(TEXT), session_key=draw(TEXT))
    if draw(st.booleans()):
        request.prompt = draw(TEXT)
    if draw(st.booleans()):
        size = draw(st.sampled_from([0, 1, 5, 255, 256, 300]))
        request.prompt_token_ids.extend(
            draw(st.lists(st.one_of(INT32, st.integers(0, 400)), min_size=size, max_size=size))
        )
    if draw(st.booleans()):
        request.sampling.CopyFrom(draw(sampling_params()))
    return request


def check_status(err: grpc.RpcError, rpc: str) -> None:
    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size exceeds" in (err.details() or ""):
        ECHO_OVERFLOW.append(f"{rpc}: {err.details()[:160]}")  # see test_error_messages_fit_in_the_trailers
        return
    assert err.code() not in BAD_CODES, f"{rpc}: {err.code().name}: {err.details()}"
    assert err.details(), f"{rpc}: {err.code().name} without a message"
    if error_info(err) is None:
        FAILURES.append(f"{rpc}: {err.code().name} without ErrorInfo: {err.details()}")


def check_item(error, rpc: str) -> None:
    assert error.code not in (2, 13), f"{rpc}: per-item {error.code}: {error.message}"
    assert error.code and error.message and error.reason, f"{rpc}: per-item error without code/message: {error}"


def call(rpc: str, fn):
    CALLS[rpc] += 1
    try:
        return fn()
    except grpc.RpcError as err:
        check_status(err, rpc)
        return None


@pytest.fixture(scope="module")
def rollout(rollout_servers):
    address = rollout_servers[2].address
    with grpc.insecure_channel(address) as channel:
        yield address, channel, rollout_pb2_grpc.RolloutServiceStub(channel)


@pytest.fixture(scope="module")
def reward(reward_server):
    with grpc.insecure_channel(reward_server.address) as channel:
        yield reward_server.address, channel, reward_pb2_grpc.RewardServiceStub(channel)


@pytest.fixture(scope="module")
def weights(tiny_model):
    return WeightSource.from_hf_checkpoint(tiny_model, chunk_bytes=64 * 1024, dtype=torch.float32)


@fuzz(300)
@given(batch=st.lists(generate_requests(), min_size=1, max_size=4))
def test_generate(rollout, batch):
    _, _, stub = rollout
    responses = call("Generate", lambda: list(stub.Generate(iter(batch), timeout=60)))
    for response in responses or []:
        if response.HasField("error"):
            check_item(response.error, "Generate")
        else:
            assert len(response.token_ids) <= MAX_NEW  # every valid length here is <= 4, the default is MAX_NEW


@fuzz(200)
@given(ids=st.lists(TEXT, max_size=5))
def test_abort(rollout, ids):
    _, _, stub = rollout
    call("Abort", lambda: stub.Abort(rollout_pb2.AbortRequest(request_ids=ids), timeout=10))


@fuzz(150)
@given(level=INT32, tags=st.lists(st.one_of(TEXT, st.sampled_from(["weights", "kv_cache"])), max_size=3))
def test_sleep_and_wake_up(rollout, level, tags):
    _, _, stub = rollout
    call("Sleep", lambda: stub.Sleep(rollout_pb2.SleepRequest(level=level), timeout=30))
    call("WakeUp", lambda: stub.WakeUp(rollout_pb2.WakeUpRequest(tags=tags), timeout=30))
    call("GetServerInfo", lambda: stub.GetServerInfo(rollout_pb2.RolloutServiceGetServerInfoRequest(), timeout=10))
    call("WakeUp", lambda: stub.WakeUp(rollout_pb2.WakeUpRequest(), timeout=30))  # the next test wants it awake


@st.composite
def random_manifests(draw):
    manifest = weights_pb2.WeightManifest(
        checksum=draw(st.sampled_from(["", "crc32c", "md5"])), total_bytes=draw(INT64)
    )
    for _ in range(draw(st.integers(0, 3))):
        manifest.tensors.add(
            name=draw(st.one_of(TEXT, st.just("model.embed_tokens.weight"))), dtype=draw(st.integers(0, 20)),
            shape=draw(st.lists(INT64, max_size=3)), nbytes=draw(INT64),
        )  # fmt: skip
    for _ in range(draw(st.integers(0, 3))):
        manifest.chunks.add(tensor_index=draw(INT32), offset=draw(INT64), length=draw(INT64))
    return manifest


CHUNK_FAULTS = ["none", "crc", "tensor_index", "offset", "truncate", "extend", "index", "empty", "no_chunk"]


@fuzz(200)
@given(data=st.data())
def test_update_weights(rollout, weights, data):
    """Random headers, or the real manifest followed by real chunks in a random order with random faults."""
    address, _, stub = rollout
    serving = call("GetWeightsStatus", lambda: stub.GetWeightsStatus(rollout_pb2.GetWeightsStatusRequest(), timeout=10))
    header = rollout_pb2.UpdateWeightsHeader(relay_targets=data.draw(st.lists(TEXT, max_size=1)))
    messages = []
    if data.draw(st.booleans()):
        header.weight_version = data.draw(INT64)
        header.manifest.CopyFrom(data.draw(random_manifests()))
        header.chunk_indices.extend(data.draw(st.lists(INT32, max_size=3)))
    else:
        header.weight_version = serving.serving_version + 1
        header.manifest.CopyFrom(weights.manifest)
        del header.relay_targets[:]  # a valid manifest with a bogus relay target is tested below on its own
    if data.draw(st.booleans()):
        messages.append(rollout_pb2.UpdateWeightsRequest(header=header))
    total = len(weights.manifest.chunks)
    order = data.draw(st.lists(st.integers(0, total - 1), max_size=total + 2))
    for i in order:
        chunk = weights.chunk_meta(i)
        chunk.data = weights.chunk_view(i).tobytes()
        fault = data.draw(st.sampled_from(CHUNK_FAULTS))
        if fault == "crc":
            chunk.crc32c ^= 1
        elif fault == "tensor_index":
            chunk.tensor_index = data.draw(INT32)
        elif fault == "offset":
            chunk.offset = data.draw(INT64)
        elif fault == "truncate":
            chunk.data = chunk.data[: len(chunk.data) // 2]
        elif fault == "extend":
            chunk.data += b"\x00" * 3
        elif fault == "index":
            chunk.chunk_index = data.draw(INT32)
        elif fault == "empty":
            chunk.data = b""
        if fault == "no_chunk":
            messages.append(rollout_pb2.UpdateWeightsRequest(header=header))
        else:
            messages.append(rollout_pb2.UpdateWeightsRequest(chunk=chunk))
    response = call("UpdateWeights", lambda: stub.UpdateWeights(iter(messages), timeout=60))
    for result in response.results if response else []:
        if result.HasField("error"):
            check_item(result.error, "UpdateWeights")


@fuzz(30)
@given(targets=st.lists(st.one_of(TEXT, st.sampled_from(["127.0.0.1:1", "[::1]:0", "unix:/nonexistent", "a:b:c"])),
                        min_size=1, max_size=2))  # fmt: skip
def test_update_weights_hostile_relay_targets(rollout, weights, targets):
    """A valid update whose relay chain points nowhere: this server commits, the unreachable hop is reported."""
    _, _, stub = rollout
    serving = weights_status(rollout[0]).serving_version
    header = rollout_pb2.UpdateWeightsHeader(
        weight_version=serving + 1, manifest=weights.manifest, relay_targets=targets
    )
    messages = [rollout_pb2.UpdateWeightsRequest(header=header)]
    for i in range(len(weights.manifest.chunks)):
        chunk = weights.chunk_meta(i)
        chunk.data = weights.chunk_view(i).tobytes()
        messages.append(rollout_pb2.UpdateWeightsRequest(chunk=chunk))
    response = call("UpdateWeights", lambda: stub.UpdateWeights(iter(messages), timeout=60))
    if response is not None:
        assert response.results[0].committed, response.results[0]
        for result in response.results[1:]:
            check_item(result.error, "UpdateWeights relay")


@fuzz(400)
@given(
    items=st.lists(
        st.builds(
            reward_pb2.ScoreRequest,
            request_id=st.one_of(TEXT, st.sampled_from(["a", "a", "b"])),
            prompt=TEXT,
            response=TEXT,
            ground_truth=st.one_of(TEXT, st.sampled_from(["7", "$\\frac{1}{2}$", "\\sqrt{", "nan", "1e999999"])),
            reward_name=st.one_of(TEXT, st.sampled_from(["math", "answer_tag", "math", "answer_tag"])),
            response_token_ids=st.lists(INT32, max_size=4),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_score(reward, items):
    _, _, stub = reward
    responses = call("Score", lambda: list(stub.Score(iter(items), timeout=60)))
    for response in responses or []:
        if response.HasField("error"):
            check_item(response.error, "Score")


ROLLOUT_METHODS = {
    "Generate": ("stream", rollout_pb2.GenerateRequest),
    "GenerateBatch": ("stream", rollout_pb2.GenerateBatchRequest),
    "Abort": ("unary", rollout_pb2.AbortRequest),
    "UpdateWeights": ("client_stream", rollout_pb2.UpdateWeightsRequest),
    "GetWeightsStatus": ("unary", rollout_pb2.GetWeightsStatusRequest),
    "Sleep": ("unary", rollout_pb2.SleepRequest),
    "WakeUp": ("unary", rollout_pb2.WakeUpRequest),
    "GetServerInfo": ("unary", rollout_pb2.RolloutServiceGetServerInfoRequest),
}
REWARD_METHODS = {
    "Score": ("stream", reward_pb2.ScoreRequest),
    "GetServerInfo": ("unary", reward_pb2.RewardServiceGetServerInfoRequest),
}
UNPARSED: list[str] = []  # bytes that are no message, not answered INVALID_ARGUMENT


def parses(message_class, payload: bytes) -> bool:
    try:
        message_class.FromString(payload)
        return True
    except Exception:
        return False


@fuzz(400)
@given(
    service=st.sampled_from(["rollout", "reward"]),
    method=st.sampled_from(sorted(set(ROLLOUT_METHODS) | set(REWARD_METHODS))),
    payloads=st.lists(
        st.one_of(st.binary(max_size=64), st.sampled_from([b"\xff\xff\xff", b"\x0a\xff", b"\x12\x05ab"])),
        min_size=1,
        max_size=3,
    ),
)
def test_garbage_bytes(rollout, reward, service, method, payloads):
    """Bytes that are not a valid serialized message (or are, by chance: then they are judged like any request).
    Never UNKNOWN / INTERNAL with a request that parses; for one that does not parse, INVALID_ARGUMENT is due:
    deviations are collected for test_unparseable_bytes_are_invalid_argument (fabric.server.ErrorInterceptor)."""
    methods, channel = (ROLLOUT_METHODS, rollout[1]) if service == "rollout" else (REWARD_METHODS, reward[1])
    if method not in methods:
        return
    kind, message_class = methods[method]
    name = f"/fabric.v1.{'RolloutService' if service == 'rollout' else 'RewardService'}/{method}"
    if kind == "unary":
        payloads = payloads[:1]
    valid = all(parses(message_class, p) for p in payloads)
    CALLS[f"raw {method}"] += 1
    try:
        if kind == "unary":
            channel.unary_unary(name)(payloads[0], timeout=30)
        elif kind == "client_stream":
            channel.stream_unary(name)(iter(payloads), timeout=30)
        else:
            list(channel.stream_stream(name)(iter(payloads), timeout=30))
        if not valid:
            UNPARSED.append(f"{method} {payloads!r}: OK (the bad message was silently ignored)")
    except grpc.RpcError as err:
        if valid or err.code() == grpc.StatusCode.UNAVAILABLE:  # a state refusal (asleep) may come before parsing
            check_status(err, f"raw {method}")
        elif err.code() != grpc.StatusCode.INVALID_ARGUMENT:
            UNPARSED.append(f"{method} {payloads!r}: {err.code().name}: {err.details()}")


def test_unparseable_bytes_are_invalid_argument(rollout, reward):
    """A good message, then bytes that are no message: the call ends INVALID_ARGUMENT (never OK, never a hang)."""
    rollout[2].WakeUp(rollout_pb2.WakeUpRequest(), timeout=10)  # raw Sleep bytes may have put it to sleep
    good_generate = rollout_pb2.GenerateRequest(
        request_id="g", prompt="Add 1 and 2.", sampling=rollout_pb2.SamplingParams(max_new_tokens=2)
    ).SerializeToString()
    good_score = reward_pb2.ScoreRequest(
        request_id="s", response="<answer>3</answer>", ground_truth="3", reward_name="answer_tag"
    ).SerializeToString()
    probes = {
        "Abort": lambda: rollout[1].unary_unary("/fabric.v1.RolloutService/Abort")(b"\xff\xff\xff", timeout=10),
        "Generate": lambda: list(
            rollout[1].stream_stream("/fabric.v1.RolloutService/Generate")(iter([good_generate, b"\n\xff"]), timeout=15)
        ),
        "Score": lambda: list(
            reward[1].stream_stream("/fabric.v1.RewardService/Score")(iter([good_score, b"\n\xff"]), timeout=15)
        ),
        "Score, a refused item first": lambda: list(
            reward[1].stream_stream("/fabric.v1.RewardService/Score")(iter([b"", b"\n\xff", b"2\x1fP"]), timeout=15)
        ),
        "Generate, a refused item first": lambda: list(
            rollout[1].stream_stream("/fabric.v1.RolloutService/Generate")(iter([b"", b"\n\xff"]), timeout=15)
        ),
    }
    for name, probe in probes.items():
        try:
            probe()
            UNPARSED.append(f"{name} probe: OK (the bad message was silently ignored)")
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
                UNPARSED.append(f"{name} probe: {err.code().name}: {err.details()}")
    print(
        f"\n{len(UNPARSED)} unparseable requests not answered INVALID_ARGUMENT, e.g.:\n  " + "\n  ".join(UNPARSED[:5])
    )
    assert not UNPARSED


def test_error_messages_fit_in_the_trailers(rollout):
    try:
        rollout[2].WakeUp(rollout_pb2.WakeUpRequest(tags=["x" * 20_000]), timeout=10)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
            ECHO_OVERFLOW.append(f"WakeUp 20k-char tag: {err.code().name}: {err.details()[:160]}")
    print(f"\n{len(ECHO_OVERFLOW)} errors too large for the trailers, e.g.:\n  " + "\n  ".join(ECHO_OVERFLOW[:5]))
    assert not ECHO_OVERFLOW


def test_oversized_messages_are_refused_resource_exhausted(rollout, reward):
    """Past the servers' max message size (fabric.channels.MAX_MESSAGE_BYTES, 64 MiB) a message is refused whole
    by gRPC itself, before anything is allocated for it."""
    from fabric.channels import MAX_MESSAGE_BYTES

    rollout[2].WakeUp(rollout_pb2.WakeUpRequest(), timeout=30)
    huge = "x" * (MAX_MESSAGE_BYTES + 1024)
    calls = {
        "Generate": lambda: list(
            rollout[2].Generate(iter([rollout_pb2.GenerateRequest(request_id="big", prompt=huge)]), timeout=60)
        ),
        "Score": lambda: list(
            reward[2].Score(
                iter([reward_pb2.ScoreRequest(request_id="big", response=huge, reward_name="answer_tag")]), timeout=60
            )
        ),
    }
    for rpc, fn in calls.items():
        CALLS[rpc] += 1
        with pytest.raises(grpc.RpcError) as err:
            fn()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (rpc, err.value)
        assert err.value.details(), rpc


def test_servers_still_serve_after_the_fuzz(rollout, reward, weights, tiny_model, reference):
    total = sum(CALLS.values())
    print(f"\nfuzz: {total} requests: {dict(CALLS)}")
    assert total >= 2000, CALLS
    assert not FAILURES, FAILURES[:5]  # every status a server chose carries google.rpc ErrorInfo
    for _, channel, _ in (rollout, reward):
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    address, _, stub = rollout
    stub.WakeUp(rollout_pb2.WakeUpRequest(), timeout=30)  # the fuzz may have left it asleep: a valid state
    report = asyncio.run(push_weights(weights, [address], transport="grpc"))  # a good update still commits
    assert report.ok, report.failed
    tokens, _ = greedy(address)
    assert tokens == reference[tiny_model]
    info = stub.GetServerInfo(rollout_pb2.RolloutServiceGetServerInfoRequest(), timeout=10)
    assert info.running_requests == 0 and info.queue_depth == 0
    scored = list(
        reward[2].Score(
            iter([reward_pb2.ScoreRequest(request_id="ok", prompt="Add 3 and 4.", response="<answer>7</answer>",
                                          ground_truth="7", reward_name="answer_tag")]),
            timeout=30,
        )
    )  # fmt: skip
    assert len(scored) == 1 and scored[0].score == 1.0 and not scored[0].HasField("error")
