"""Weight sync: how fast a new version reaches the rollout servers, against the limits of the wire.

1. Throughput on loopback, one rollout server (vLLM on a >= 200 MB model), commit into vLLM included:
   raw TCP between two processes (the limit) vs the fabric's UpdateWeights over gRPC (1 and 4 streams) and over its
   raw-TCP data plane.
2. Fan-out, 1 / 2 / 4 rollout servers, each in its own network namespace behind a 1 Gbit/s veth link (tc), the
   sender in another: the sender's egress bytes and the wall time, relay chain vs direct streams. Every server has
   received one version before the clock starts (as in a run after its first step); each row is the median of 3.
Run with `make bench` (all benchmarks) or `python -m bench weight_sync`.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fabric.procs import ServerProcess, start_all
from fabric.weights.transports import tcp

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
BIG = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=5,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
)  # ~225 MB float32
REPEATS = 3  # fan-out pushes per configuration; the table shows the median
MEDIUM = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
)  # ~68 MB float32
console = Console()


def build_model(name: str, overrides: dict) -> Path:
    from fabric.models.tiny import make_tiny_model

    out = CACHE / name
    if not (out / "model.safetensors").exists():
        make_tiny_model(out, seed=0, **overrides)
    return out


def rollout_config(model: Path, path: Path) -> Path:
    path.write_text(
        "actor_infer:\n"
        f"  pretrain: {model}\n"
        "  generating_args: {max_new_tokens: 8, temperature: 0.0}\n"
        "  strategy_args:\n"
        "    strategy_name: vllm\n"
        "    strategy_config: {block_size: 32, dtype: float32, max_model_len: 256, enforce_eager: true,\n"
        "                      gpu_memory_utilization: 0.1}\n"
        "  infer_batch_size: 8\n"
    )
    return path


def _raw_receiver(port_queue, nbytes):
    buf = memoryview(bytearray(b"\1") * nbytes)  # in memory (written once) before the sender's clock starts
    listener = socket.create_server(("127.0.0.1", 0))
    port_queue.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    tcp.tune(conn)  # the data plane's own socket settings: the same wire
    got = 0
    while got < nbytes:
        got += conn.recv_into(buf[got:], min(4 << 20, nbytes - got))
    conn.sendall(b"k")


def raw_tcp_gbps(nbytes: int, repeats: int = 3) -> float:
    """The wire's limit here: one Python process sendall()s to another that recv_into()s a buffer already in memory
    (a fresh one would add first-touch page faults, which cost about as much as the copy itself)."""
    best = 0.0
    payload = memoryview(bytearray(os.urandom(1 << 20)) * (nbytes >> 20))
    for _ in range(repeats):
        queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=_raw_receiver, args=(queue, len(payload)))
        proc.start()
        sock = socket.create_connection(("127.0.0.1", queue.get()))
        tcp.tune(sock)
        start = time.perf_counter()
        sock.sendall(payload)
        sock.recv(1)
        best = max(best, len(payload) / (time.perf_counter() - start) / 1e9)
        sock.close()
        proc.join()
    return best


def throughput() -> list[dict]:
    """Per path: the best of 3 pushes (the first push of a server also allocates its staging file: reported apart).
    `gbps` is wall time at the sender, commit into vLLM included; `receive_gbps` leaves the commit out."""
    from fabric.weights.sender import WeightSource, push_weights

    model = build_model("model-225m", BIG)
    with tempfile.TemporaryDirectory() as tmp:
        config = rollout_config(model, Path(tmp) / "rollout.yaml")
        with ServerProcess("rollout", config, log_path=Path(tmp) / "server.log") as server:
            source = WeightSource.from_hf_checkpoint(model)
            size = source.total_bytes
            console.print(f"model: {size / 1e6:.0f} MB in {len(source.manifest.chunks)} chunks of <= 4 MiB")
            raw = raw_tcp_gbps(size)
            rows = [dict(path="raw TCP, 2 processes (the limit)", gbps=raw, receive_gbps=raw, commit_s=0.0)]
            version = 0

            def push(transport, streams=1):
                nonlocal version
                version += 1
                report = asyncio.run(
                    push_weights(
                        source, [server.address], version=version, mode="direct", transport=transport, streams=streams
                    )
                )
                assert report.ok, report.failed
                commit = report.results[0].commit_seconds
                return dict(gbps=size / report.seconds / 1e9, receive_gbps=size / (report.seconds - commit) / 1e9,
                            commit_s=commit)  # fmt: skip

            first = push("tcp")
            rows.append(dict(path="fabric TCP data plane, first push (staging file allocated)", **first))
            for label, transport, streams in [
                ("fabric gRPC, 1 stream", "grpc", 1),
                ("fabric gRPC, 4 streams", "grpc", 4),
                ("fabric TCP data plane", "tcp", 1),
            ]:
                best = max((push(transport, streams) for _ in range(3)), key=lambda r: r["gbps"])
                rows.append(dict(path=label, **best))
    return rows


def fanout() -> list[dict]:
    from bench._netns import Cluster

    ok, why = Cluster.available()
    if not ok:
        console.print(f"[yellow]fan-out skipped: {why}")
        return []
    model = build_model("model-68m", MEDIUM)
    results = []
    with tempfile.TemporaryDirectory() as tmp, Cluster(5, rate="1gbit") as cluster:
        config = rollout_config(model, Path(tmp) / "rollout.yaml")
        sender, hosts = cluster.hosts[0], cluster.hosts[1:]
        servers = [
            ServerProcess(
                "rollout",
                config,
                name=f"rollout-{h.name}",
                host=h.ip,
                prefix=h.prefix,
                log_path=Path(tmp) / f"{h.name}.log",
            )
            for h in hosts
        ]
        try:
            addresses = start_all(servers, timeout=600)
            # Untimed warm-up: every server receives one version first, as after a run's first step, so that no row
            # pays a server's first push (its staging file allocated, the worker mapping it) and the others not.
            configurations = [(len(addresses), "direct", False)]
            for _ in range(REPEATS):  # interleaved, so that a burst of load on the box does not hit one row alone
                for count in (1, 2, 4):  # with one target, relay and direct are the same stream: measured once
                    modes = ("relay",) if count == 1 else ("relay", "direct")
                    configurations += [(count, mode, True) for mode in modes]
            for version, (count, mode, timed) in enumerate(configurations, start=1):
                cmd = [
                    *sender.prefix,
                    sys.executable,
                    "-m",
                    "fabric.cli",
                    "push-weights",
                    "--checkpoint",
                    str(model),
                    "--version",
                    str(version),
                    "--mode",
                    mode,
                    "--transport",
                    "tcp",
                ]
                for address in addresses[:count]:
                    cmd += ["--target", address]
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                line = re.search(r"bytes=(\d+) sent=(\d+) seconds=([\d.]+)", out.stdout)
                if out.returncode != 0 or not line:
                    raise RuntimeError(f"push-weights failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
                size, sent, seconds = int(line.group(1)), int(line.group(2)), float(line.group(3))
                if not timed:
                    continue
                results.append(
                    dict(
                        servers=count,
                        mode=mode,
                        model_mb=size / 1e6,
                        egress_mb=sent / 1e6,
                        egress_x=sent / size,
                        seconds=seconds,
                        # until every server of the chain had every byte (its time minus its own commit)
                        receive_s=max(r["seconds"] - r["commit_seconds"] for r in per_server(out.stdout)),
                        commit_s=max(r["commit_seconds"] for r in per_server(out.stdout)),
                    )
                )
        finally:
            for server in servers:
                server.stop(grace=5)
    medians = []  # per configuration, the run with the median wall time
    for key in dict.fromkeys((r["servers"], r["mode"]) for r in results):
        runs = sorted((r for r in results if (r["servers"], r["mode"]) == key), key=lambda r: r["seconds"])
        medians.append(runs[len(runs) // 2])
    return medians


def per_server(stdout: str) -> list[dict]:
    return json.loads(re.search(r"^results=(.*)$", stdout, re.M).group(1))


def main() -> None:
    rows = throughput()
    limit = rows[0]["gbps"]
    table = Table(title="weight sync throughput, loopback, one rollout server (best of 3)")
    for column in ("path", "GB/s, commit included", "vs raw TCP", "GB/s, receive only", "vs raw TCP", "commit s"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for r in rows:
        table.add_row(r["path"], f"{r['gbps']:.2f}", f"{r['gbps'] / limit:.0%}", f"{r['receive_gbps']:.2f}",
                      f"{r['receive_gbps'] / limit:.0%}", f"{r['commit_s']:.3f}")  # fmt: skip
    console.print(table)

    fan = fanout()
    if fan:
        one = next(r for r in fan if r["servers"] == 1)
        table = Table(
            title=f"fan-out: servers in namespaces behind 1 Gbit/s links, sender in its own; median of {REPEATS} pushes "
            "(receive: until the last server had every byte; commit: into vLLM, CPU-bound on 2 cores)"
        )
        columns = ("servers", "mode", "sender egress MB", "egress / model", "seconds", "vs 1", "receive s",
                   "receive vs 1", "commit s")  # fmt: skip
        for column in columns:
            table.add_column(column, justify="right")
        for r in fan:
            table.add_row(str(r["servers"]), r["mode"], f"{r['egress_mb']:.0f}", f"{r['egress_x']:.2f}x",
                          f"{r['seconds']:.2f}", f"{r['seconds'] / one['seconds']:.2f}x", f"{r['receive_s']:.2f}",
                          f"{r['receive_s'] / one['receive_s']:.2f}x", f"{r['commit_s']:.2f}")  # fmt: skip
        console.print(table)
    figures = {"throughput": rows, "fanout": fan}
    out = CACHE / "weight_sync.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    console.print(f"figures written to {out}")


if __name__ == "__main__":
    main()
