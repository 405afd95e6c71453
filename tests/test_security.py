"""Security on real servers: a bearer token on every service (health excepted), TLS and mutual TLS.

One rollout server, one reward server and a trainer run with a `security` section (token + mTLS); the tests call
them as strangers (no token, wrong token, wrong CA, no client certificate) and as members.
"""

from __future__ import annotations

import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fabric import security
from fabric.procs import ServerProcess, start_all
from fabric.v1 import reward_pb2, reward_pb2_grpc, rollout_pb2, rollout_pb2_grpc, trainer_pb2, trainer_pb2_grpc

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory, name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=directory)  # fmt: skip


def make_cert(directory, ca, name):
    (directory / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", cwd=directory)  # fmt: skip
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "ca", "server")
    make_cert(d, "ca", "client")
    make_cert(d, "other-ca", "stranger")
    (d / "token").write_text(TOKEN + "\n")
    return d


@pytest.fixture(scope="module")
def secured(pki, tiny_model, tmp_path_factory):
    from fabric.tasks.arithmetic import write_dataset

    tmp = tmp_path_factory.mktemp("secured")
    dataset = write_dataset(tmp / "train.jsonl", count=64, max_operand=9)
    config = tmp / "config.yaml"
    config.write_text(f"""
output_dir: {tmp}/run
max_steps: 500
rollout_batch_size: 2
num_return_sequences_in_group: 2
response_length: 8
prompt_length: 16
security:
  token_file: {pki}/token
  tls_cert: {pki}/server.pem
  tls_key: {pki}/server.key
  tls_ca: {pki}/ca.pem
  require_client_cert: true
actor_train:
  pretrain: {tiny_model}
  data_args: {{file_name: {dataset}}}
  training_args: {{per_device_train_batch_size: 4}}
actor_infer:
  pretrain: {tiny_model}
  generating_args: {{max_new_tokens: 8, temperature: 0.0}}
  strategy_args:
    strategy_name: vllm
    strategy_config: {{block_size: 32, dtype: float32, max_model_len: 128, enforce_eager: true,
                       gpu_memory_utilization: 0.1}}
  infer_batch_size: 8
rewards:
  answer_tag: {{worker_cls: answer_tag}}
""")
    servers = [
        ServerProcess("rollout", config, log_path=tmp / "rollout.log"),
        ServerProcess("reward", config, log_path=tmp / "reward.log"),
    ]
    rollout, reward = start_all(servers, timeout=400)
    trainer = ServerProcess(
        "trainer", config, command=["train", "--rollout", rollout, "--reward", reward], log_path=tmp / "trainer.log"
    )
    trainer.start()
    trainer_address = trainer.wait_ready(timeout=300)
    yield {"rollout": rollout, "reward": reward, "trainer": trainer_address, "trainer_proc": trainer}
    trainer.stop(grace=30)
    for server in servers:
        server.stop()


def member(pki) -> security.SecurityConfig:
    return security.SecurityConfig(
        TOKEN, (pki / "client.pem").read_bytes(), (pki / "client.key").read_bytes(), (pki / "ca.pem").read_bytes()
    )


def tls_only(pki, token=None, cert="client", ca="ca") -> security.SecurityConfig:
    certificate = (pki / f"{cert}.pem").read_bytes() if cert else None
    key = (pki / f"{cert}.key").read_bytes() if cert else None
    return security.SecurityConfig(token, certificate, key, (pki / f"{ca}.pem").read_bytes())


CALLS = {
    "rollout.GetServerInfo": ("rollout", lambda ch: rollout_pb2_grpc.RolloutServiceStub(ch).GetServerInfo(
        rollout_pb2.RolloutServiceGetServerInfoRequest(), timeout=10)),
    "rollout.Generate": ("rollout", lambda ch: list(rollout_pb2_grpc.RolloutServiceStub(ch).Generate(iter([
        rollout_pb2.GenerateRequest(request_id="a", prompt="Add 1 and 2.\n")]), timeout=30))),
    "rollout.GenerateBatch": ("rollout", lambda ch: list(rollout_pb2_grpc.RolloutServiceStub(ch).GenerateBatch(iter([
        rollout_pb2.GenerateBatchRequest(
            requests=[rollout_pb2.GenerateRequest(request_id="a", prompt="Add 1 and 2.\n")])]), timeout=30))),
    "rollout.GetWeightsStatus": ("rollout", lambda ch: rollout_pb2_grpc.RolloutServiceStub(ch).GetWeightsStatus(
        rollout_pb2.GetWeightsStatusRequest(), timeout=10)),
    "reward.Score": ("reward", lambda ch: list(reward_pb2_grpc.RewardServiceStub(ch).Score(iter([
        reward_pb2.ScoreRequest(request_id="a", response="<answer>3</answer>", ground_truth="3",
                                reward_name="answer_tag")]), timeout=30))),
    "reward.GetServerInfo": ("reward", lambda ch: reward_pb2_grpc.RewardServiceStub(ch).GetServerInfo(
        reward_pb2.RewardServiceGetServerInfoRequest(), timeout=10)),
    "trainer.GetStatus": ("trainer", lambda ch: trainer_pb2_grpc.TrainerServiceStub(ch).GetStatus(
        trainer_pb2.GetStatusRequest(), timeout=10)),
}  # fmt: skip


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_no_token_or_a_wrong_one_is_unauthenticated_on_every_service(secured, pki, call, token):
    service, invoke = CALLS[call]
    with security.sync_channel(secured[service], security=tls_only(pki, token=token)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            invoke(channel)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in err.value.details()


@pytest.mark.parametrize("call", list(CALLS))
def test_members_get_through(secured, pki, call):
    service, invoke = CALLS[call]
    with security.sync_channel(secured[service], security=member(pki)) as channel:
        assert invoke(channel)


@pytest.mark.parametrize("service", ["rollout", "reward", "trainer"])
def test_health_needs_no_token(secured, pki, service):
    with security.sync_channel(secured[service], security=tls_only(pki)) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_tls_with_a_wrong_ca_fails_to_connect(secured, pki):
    with security.sync_channel(secured["rollout"], security=tls_only(pki, TOKEN, ca="other-ca")) as channel:
        with pytest.raises(grpc.RpcError) as err:
            CALLS["rollout.GetServerInfo"][1](channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("cert", [None, "stranger"])
def test_mtls_refuses_clients_without_a_certificate_from_the_ca(secured, pki, cert):
    with security.sync_channel(secured["reward"], security=tls_only(pki, TOKEN, cert=cert)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            CALLS["reward.GetServerInfo"][1](channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_to_a_tls_server_fails(secured):
    with grpc.insecure_channel(secured["rollout"]) as channel:
        with pytest.raises(grpc.RpcError) as err:
            CALLS["rollout.GetServerInfo"][1](channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_trainer_runs_over_mtls_and_token_and_stops_when_told(secured, pki):
    """The trainer reached both servers through TLS + token (its steps advance), pushed weights over gRPC/TLS
    (the raw-TCP data plane is off under TLS), and a member's Stop ends it cleanly."""
    with security.sync_channel(secured["trainer"], security=member(pki)) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        deadline = time.monotonic() + 120
        while stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10).step < 2:
            assert time.monotonic() < deadline, secured["trainer_proc"].last_lines()
            time.sleep(0.5)
        status = stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
        assert status.weight_version >= 3 and status.last_metrics.samples == 4
        stub.Stop(trainer_pb2.StopRequest(), timeout=10)
    assert secured["trainer_proc"].proc.wait(timeout=120) == 0
    with security.sync_channel(secured["rollout"], security=member(pki)) as channel:
        weights = rollout_pb2_grpc.RolloutServiceStub(channel).GetWeightsStatus(
            rollout_pb2.GetWeightsStatusRequest(), timeout=10
        )
    assert weights.tcp_data_port == 0 and weights.serving_version >= 3
