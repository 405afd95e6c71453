"""TLS and bearer tokens, as each client's example applies them. The fabric servers do not take TLS or token
options yet, so a small Python gRPC server stands in here: it serves both services over TLS, refuses calls
without the right token, and answers deterministically; what is under test is the client side."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from fabric.v1 import reward_pb2, reward_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from tests.clients.conftest import run_example

TOKEN = "s3cret-token"
PROMPTS = ["Add 3 and 4.\n", "Add 12 and 30.\n"]


def require_token(context: grpc.ServicerContext) -> None:
    if dict(context.invocation_metadata()).get("authorization") != f"Bearer {TOKEN}":
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: missing or wrong bearer token")


class TokenRollout(rollout_pb2_grpc.RolloutServiceServicer):
    def Generate(self, request_iterator, context):
        require_token(context)
        for request in request_iterator:
            n = request.sampling.num_return_sequences or 1
            for index in range(n):
                yield rollout_pb2.GenerateResponse(
                    request_id=request.request_id,
                    sample_index=index,
                    token_ids=[len(request.prompt), index],
                    text=f"<answer>{len(request.prompt)}</answer>",
                    finish_reason=rollout_pb2.FINISH_REASON_STOP,
                )


class TokenReward(reward_pb2_grpc.RewardServiceServicer):
    def Score(self, request_iterator, context):
        require_token(context)
        for request in request_iterator:
            yield reward_pb2.ScoreResponse(request_id=request.request_id, score=len(request.response) / 8)


def make_certificates(folder: Path) -> tuple[Path, Path, Path, Path]:
    """A CA and a server certificate it signed (for 127.0.0.1 and localhost), plus an unrelated second CA."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    for name in ("ca", "other-ca"):
        openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN=fabric test {name}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.pem",
        )
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr"
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    )
    return folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "other-ca.pem"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[dict]:
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl not found (makes the test certificates): apt-get install openssl")
    ca, cert, key, other_ca = make_certificates(tmp_path_factory.mktemp("tls"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    rollout_pb2_grpc.add_RolloutServiceServicer_to_server(TokenRollout(), server)
    reward_pb2_grpc.add_RewardServiceServicer_to_server(TokenReward(), server)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield {"address": f"127.0.0.1:{port}", "ca": str(ca), "other_ca": str(other_ca)}
    server.stop(None)


def tls_args(tls_server, *extra: str) -> list[str]:
    address = tls_server["address"]
    args = ["--rollout", address, "--reward", address, "--n", "2", "--timeout-s", "20"]
    for i, prompt in enumerate(PROMPTS):
        args += ["--prompt", prompt, "--ground-truth", str(i)]
    return [*args, *extra]


def test_tls_with_ca_file_and_bearer_token(client, tls_server):
    run = run_example(client, tls_args(tls_server, "--ca-file", tls_server["ca"], "--token", TOKEN))
    assert run.returncode == 0, run.output
    samples = run.of("sample")
    assert [(s["request_id"], s["sample_index"]) for s in samples] == [
        ("task-0", 0),
        ("task-0", 1),
        ("task-1", 0),
        ("task-1", 1),
    ]
    for sample in samples:
        prompt = PROMPTS[int(sample["request_id"].split("-")[1])]
        assert sample["token_ids"] == [len(prompt), sample["sample_index"]]
        assert sample["score"] == len(sample["text"]) / 8
        assert sample["finish_reason"] == "STOP"


def test_a_wrong_token_is_refused_as_unauthenticated(client, tls_server):
    run = run_example(client, tls_args(tls_server, "--ca-file", tls_server["ca"], "--token", "wrong"))
    assert run.returncode == 1, run.output
    [fatal] = run.of("fatal")
    assert fatal["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0], run.output
    assert fatal["message"] == "authorization: missing or wrong bearer token"


def test_a_server_certificate_from_another_ca_is_not_trusted(client, tls_server):
    run = run_example(client, tls_args(tls_server, "--ca-file", tls_server["other_ca"], "--token", TOKEN))
    assert run.returncode == 1, run.output
    [fatal] = run.of("fatal")
    # gRPC core (C++) and grpc-go call a failed handshake UNAVAILABLE; connect-node reports Node's TLS error as
    # INTERNAL, with Node's message ("unable to verify the first certificate").
    expected = grpc.StatusCode.INTERNAL if client.name == "typescript" else grpc.StatusCode.UNAVAILABLE
    assert fatal["code"] == expected.value[0], run.output
    assert not run.of("sample")
