"""A rollout server over the fake engine (tests/rollout/fake_engine.py) in a process of its own, for the tests whose
subject is a peer that dies (SIGKILL) and comes back: that peer needs no vLLM start. It takes the weights of MODEL's
architecture (checked and staged as on vLLM), generates as the fake engine does, offers gloo when asked, and shows the
fingerprint of the weights it serves in GetServerInfo's engine_config_json.

    python -m tests.rollout.fake_server MODEL [--port P] [--gloo] [--token-seconds S] [--infer-batch-size N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from fabric.procs import ServerProcess
from fabric.rollout.servicer import RolloutServicer
from fabric.server import FabricServer, print_ready
from fabric.v1 import rollout_pb2_grpc
from tests.rollout.fake_engine import FakeEngine


class ServedFakeEngine(FakeEngine):
    def __init__(self, model: str, token_seconds: float, gloo: bool):
        from transformers import AutoConfig

        super().__init__(token_seconds=token_seconds)
        self.hf_config = AutoConfig.from_pretrained(model)  # the pushes it accepts: this model's tensors
        self.gloo = gloo

    def engine_config_json(self) -> str:
        return json.dumps({"token_seconds": self.token_seconds, "weights": self.weights})

    def weight_transports(self, store) -> list:
        from fabric.weights.transports.collective import CollectiveReceiver

        return [CollectiveReceiver("gloo")] if self.gloo else []


def fake_rollout_process(model: str, name: str, port: int = 0, *options: str) -> ServerProcess:
    """The fake server as a ServerProcess (not started): stopped, signalled and waited for as a real one."""
    from tests.servers import server_process

    server = server_process("rollout", "unused", name=name)
    server.cmd = [sys.executable, "-m", "tests.rollout.fake_server", model, "--port", str(port), *options]
    return server


async def main(args) -> None:
    from tests.rollout.test_servicer import fake_config

    engine = ServedFakeEngine(args.model, args.token_seconds, args.gloo)
    servicer = RolloutServicer(engine, fake_config(infer_batch_size=args.infer_batch_size, max_queue_length=1000))
    server = FabricServer(
        ["fabric.v1.RolloutService"],
        lambda s: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, s),
        port=args.port,
        on_drain=servicer.drain,
    )
    servicer.server_name = server.address
    await engine.start()
    try:
        await server.serve_forever(grace=5, ready=print_ready("rollout"))
    finally:
        servicer.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--gloo", action="store_true")
    parser.add_argument("--token-seconds", type=float, default=0.01)
    parser.add_argument("--infer-batch-size", type=int, default=4)
    asyncio.run(main(parser.parse_args()))
