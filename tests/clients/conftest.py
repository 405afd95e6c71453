"""Fixtures of the client interop tests: each client built once per session (when its toolchain is present, else
its tests skip with the reason and the fix), and real rollout and reward servers on the tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabric.procs import ServerProcess
from tests.servers import TEST_ENV

ROOT = Path(__file__).resolve().parents[2]
GOCODE = Path("/usr/share/gocode/src")


@dataclass(frozen=True)
class ClientKind:
    name: str
    make_target: str
    command: tuple[str, ...]  # the built example, relative to the repository root

    def missing_toolchain(self) -> str | None:
        """Why this client cannot be built here (with the fix), or None."""
        fix = "run `make clients` (installs the toolchains from apt and npm)"
        if self.name == "typescript":
            if not shutil.which("node"):
                return f"node not found: {fix}"
            if not (ROOT / "clients/typescript/node_modules/.installed-stamp").exists():
                return f"clients/typescript/node_modules not installed: {fix}"
        elif self.name == "cpp":
            for tool in ("cmake", "c++", "pkg-config"):
                if not shutil.which(tool):
                    return f"{tool} not found: {fix}"
            if subprocess.run(["pkg-config", "--exists", "grpc++", "protobuf"]).returncode != 0:
                return f"libgrpc++-dev / libprotobuf-dev not installed: {fix}"
        elif self.name == "go":
            if not shutil.which("go"):
                return f"go not found: {fix}"
            if not (GOCODE / "google.golang.org/grpc").is_dir():
                return f"golang-google-grpc-dev not installed: {fix}"
            if (GOCODE / "github.com/golang/protobuf/proto/table_unmarshal.go").exists():
                return f"golang-github-golang-protobuf-1-3-dev is installed (grpc-go needs the 1.5 package): {fix}"
        return None


CLIENT_KINDS = {
    "typescript": ClientKind("typescript", "clients-build-typescript", ("node", "clients/typescript/dist/example.js")),
    "cpp": ClientKind("cpp", "clients-build-cpp", ("clients/cpp/build/fabric_example",)),
    "go": ClientKind("go", "clients-build-go", ("clients/go/build/fabric-example",)),
}
_built: dict[str, str | None] = {}


def build_client(kind: ClientKind) -> None:
    """Builds the client once per session; skips when its toolchain is absent, fails when the build does."""
    if kind.name not in _built:
        reason = kind.missing_toolchain()
        if reason is None:
            result = subprocess.run(["make", "-s", kind.make_target], cwd=ROOT, capture_output=True, text=True)
            if result.returncode != 0:
                reason = f"FAILED: `make {kind.make_target}`:\n{(result.stdout + result.stderr)[-4000:]}"
        _built[kind.name] = reason
    reason = _built[kind.name]
    if reason and reason.startswith("FAILED"):
        pytest.fail(reason)
    if reason:
        pytest.skip(f"{kind.name} client: {reason}")


@dataclass
class ExampleRun:
    returncode: int
    events: list[dict]
    output: str

    def of(self, event: str) -> list[dict]:
        return [e for e in self.events if e["event"] == event]


def run_example(kind: ClientKind, args: list[str], timeout: float = 60) -> ExampleRun:
    result = subprocess.run([*kind.command, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    try:
        events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise AssertionError(f"{kind.name} example printed a line that is not JSON ({exc}):\n{output}") from None
    return ExampleRun(result.returncode, events, output)


@pytest.fixture(params=list(CLIENT_KINDS))
def client(request) -> ClientKind:
    kind = CLIENT_KINDS[request.param]
    build_client(kind)
    return kind


@pytest.fixture(scope="module")
def servers(rollout_cluster, tmp_path_factory) -> Iterator[dict[str, str]]:
    """A real rollout server (vLLM on the tiny model: one of the session's, tests/conftest.py rollout_cluster) and a
    real reward server."""
    tmp = tmp_path_factory.mktemp("client-servers")
    (tmp / "reward.yaml").write_text(
        "rewards: {answer_tag: {worker_cls: answer_tag}, math: {worker_cls: math_rule, num_workers: 1}}\n"
    )
    reward = ServerProcess("reward", tmp / "reward.yaml", env=TEST_ENV, log_path=tmp / "reward.log", own_session=False)
    try:
        yield {"rollout": rollout_cluster.procs[0].address, "reward": reward.start().wait_ready(240)}
    finally:
        reward.stop()
