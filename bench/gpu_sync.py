"""GPU figures, for a CUDA host (the H100 lent to sessions): megatron-core train steps of the tiny model and of a
~113M-parameter model (bf16), and the weight push from GPU memory to a rollout-side receiver on the same host.

The receiver is the fabric's WeightReceiver (staging, crc32c, atomic commit) behind a RolloutService; that host has no
vLLM, so its engine adapter commits into a transformers model on the GPU instead of a vLLM engine (the commit is a
copy into the model's parameters either way). Compared side by side: raw TCP between two processes (the wire's
limit), the fabric's gRPC stream (1 and 4 streams) and its raw-TCP data plane. Without CUDA it says so and returns.
`python -m bench gpu_sync`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

MEDIUM = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=10, num_attention_heads=16,
              num_key_value_heads=4, head_dim=64, max_position_embeddings=2048)  # fmt: skip


class HFEngine:
    """The receiver's engine on a host without vLLM: commits into a transformers model on the GPU."""

    def __init__(self, model_dir: str):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = model_dir
        self.hf_config = AutoConfig.from_pretrained(model_dir)
        self.dtype = torch.bfloat16
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_config(self.hf_config, dtype=self.dtype).to(self.device)
        self.weight_version = 0
        self.sleep_state = 1

    async def commit_weights(self, update_info: dict, version: int) -> None:
        from fabric.weights.staging import tensors_from_update_info

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors_from_update_info(update_info):
                if name in params:
                    params[name].copy_(tensor, non_blocking=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.weight_version = version


def serve(model_dir: str) -> None:
    from fabric.server import FabricServer
    from fabric.v1 import rollout_pb2_grpc
    from fabric.weights.receiver import WeightReceiver

    class WeightsOnly(rollout_pb2_grpc.RolloutServiceServicer):
        def __init__(self, receiver):
            self.receiver = receiver

        async def UpdateWeights(self, request_iterator, context):
            return await self.receiver.update_weights(request_iterator, context)

        async def GetWeightsStatus(self, request, context):
            return self.receiver.status()

    async def main():
        servicer = WeightsOnly(None)
        server = FabricServer(
            ["fabric.v1.RolloutService"], lambda s: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, s)
        )
        servicer.receiver = WeightReceiver(HFEngine(model_dir), f"127.0.0.1:{server.port}")
        await server.serve_forever(
            ready=lambda address: print(f"fabric rollout server listening on {address}", flush=True)
        )

    asyncio.run(main())


def time_train_steps(model_dir: str, batch: int, seq: int, steps: int = 5) -> dict:
    from fabric.trainer import losses
    from fabric.trainer.policy import OptimConfig, Policy, TrainBatch

    policy = Policy.from_hf(model_dir, OptimConfig(lr=1e-5), dtype=torch.bfloat16, device="cuda")
    params = sum(p.numel() for p in policy.model.parameters())
    vocab = policy.model.hf_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, vocab - 1, (batch, seq // 2), generator=g).tolist()
    responses = torch.randint(1, vocab - 1, (batch, seq // 2), generator=g).tolist()
    data = TrainBatch.from_token_lists(prompts, responses, pad_id=0)
    data.advantages = losses.grpo_advantages(torch.randn(batch, generator=g), group_size=batch)
    for _ in range(2):
        policy.train_step(data)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        policy.train_step(data)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {"params_m": params / 1e6, "batch": batch, "seq": seq, "step_ms": seconds * 1e3,
            "tokens_per_s": batch * seq / seconds, "policy": policy}  # fmt: skip


def push_figures(policy, model_dir: str, tmp: Path) -> list[tuple[str, float]]:
    from bench.weight_sync import raw_tcp_gbps
    from fabric.procs import ServerProcess
    from fabric.weights.sender import WeightSource, push_weights

    rows = []
    start = time.perf_counter()
    source = WeightSource(policy.hf_weights(), dtype=torch.bfloat16)
    gather = time.perf_counter() - start
    size = source.total_bytes
    rows.append((f"GPU -> host staging of {size / 1e6:.0f} MB (HF layout)", size / gather / 1e9))
    rows.append(("raw TCP, 2 processes (the limit)", raw_tcp_gbps(size)))
    server = ServerProcess("rollout", "unused", command=["-c"], log_path=tmp / "receiver.log")
    server.cmd = [sys.executable, "-m", "bench.gpu_sync", "--serve", model_dir]
    with server:
        version = 0
        for label, transport, streams in [("fabric gRPC, 1 stream", "grpc", 1), ("fabric gRPC, 4 streams", "grpc", 4),
                                          ("fabric TCP data plane", "tcp", 1)]:  # fmt: skip
            best = 0.0
            for _ in range(3):
                version += 1
                report = asyncio.run(push_weights(source, [server.address], version=version, mode="direct",
                                                  transport=transport, streams=streams))  # fmt: skip
                assert report.ok, report.failed
                best = max(best, size / report.seconds / 1e9)
            rows.append((f"{label} (into the GPU model)", best))
        start = time.perf_counter()
        source = WeightSource(policy.hf_weights(), dtype=torch.bfloat16)
        report = asyncio.run(push_weights(source, [server.address], version=version + 1, transport="tcp"))
        rows.append(
            ("end to end: GPU weights -> receiver's GPU model, TCP", size / (time.perf_counter() - start) / 1e9)
        )
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        print("gpu_sync: skipped, no CUDA device here (run it on a GPU host: python -m bench gpu_sync)")
        return
    from fabric.models.tiny import make_tiny_model

    results = {"device": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = make_tiny_model(tmp / "tiny")
        medium = make_tiny_model(tmp / "medium", **MEDIUM)
        tiny_fig = time_train_steps(str(tiny), batch=64, seq=32)
        del tiny_fig["policy"]
        medium_fig = time_train_steps(str(medium), batch=8, seq=1024)
        policy = medium_fig.pop("policy")
        results["train"] = {"tiny": tiny_fig, "medium": medium_fig}
        results["push"] = push_figures(policy, str(medium), tmp)
    print(json.dumps(results, indent=2))
    for name, fig in results["train"].items():
        print(
            f"megatron train step, {name}: {fig['params_m']:.1f} M params, {fig['batch']}x{fig['seq']} tokens, "
            f"bf16: {fig['step_ms']:.1f} ms/step, {fig['tokens_per_s']:.0f} tokens/s"
        )
    limit = next(g for label, g in results["push"] if label.startswith("raw TCP"))
    for label, gbps in results["push"]:
        print(f"{label:60s} {gbps:6.2f} GB/s  ({gbps / limit:.0%} of raw TCP)")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
    else:
        main()
