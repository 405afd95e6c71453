"""`fabric push-weights`: pushes an HF checkpoint (safetensors) to running rollout servers and prints the timing."""

from __future__ import annotations

import asyncio
import json
import sys

from rich.console import Console
from rich.table import Table

from fabric.weights.sender import WeightSource, push_weights, serving_dtype, weights_status


async def _push(args) -> int:
    if args.config:
        from fabric import security
        from fabric.config import load_config

        security.configure(security.SecurityConfig.from_cfg(load_config(args.config)))
    console = Console(stderr=False)
    found = await asyncio.gather(*(weights_status(t) for t in args.target), return_exceptions=True)
    dtype = serving_dtype([s for s in found if not isinstance(s, BaseException)])  # the unreachable get a row below
    with console.status(f"loading {args.checkpoint}"):
        source = WeightSource.from_hf_checkpoint(args.checkpoint, int(args.chunk_mib * 1024 * 1024), dtype)
        source = _on_gpu_for(args.transport, source)
    with console.status(f"pushing {source.total_bytes / 1e6:.1f} MB to {len(args.target)} server(s)"):
        report = await push_weights(
            source,
            args.target,
            version=args.version,
            mode=args.mode,
            transport=args.transport,
        )
    table = Table(title=f"weight version {report.version}: {report.mode} over {report.transport}")
    for column in ("server", "committed", "received MB", "seconds", "commit s", "transport", "error"):
        table.add_column(column)
    for r in report.results:
        table.add_row(
            r.server,
            "already" if r.already_committed else str(r.committed),
            f"{r.bytes_received / 1e6:.1f}",
            f"{r.seconds:.2f}",
            f"{r.commit_seconds:.3f}",
            f"{r.transport} ({r.transport_reason})" if r.transport_reason else r.transport,
            r.error.message,
        )
    console.print(table)
    print(
        f"bytes={source.total_bytes} sent={report.bytes_sent} seconds={report.seconds:.3f} "
        f"GB/s={report.gbps:.3f} version={report.version} ok={report.ok}"
    )
    per_server = [
        {"server": r.server, "seconds": r.seconds, "commit_seconds": r.commit_seconds} for r in report.results
    ]
    print(f"results={json.dumps(per_server)}")  # for scripts: per server, receive + commit and commit alone
    return 0 if report.ok else 1


def _on_gpu_for(transport: str, source: WeightSource) -> WeightSource:
    """The GPU paths send from GPU memory (as a trainer does): the checkpoint goes to this host's GPU first."""
    import torch

    if transport not in ("nccl", "ipc") or not torch.cuda.is_available():
        return source  # the sender then falls back to a host path and says why
    named = ((n, t.to("cuda")) for n, t in zip(source.names, source.tensors, strict=True))
    return WeightSource(named, source.manifest.chunks[0].length if source.manifest.chunks else 4 << 20)


def cli_main(args) -> int:
    try:
        return asyncio.run(_push(args))
    except FileNotFoundError as exc:
        print(f"fabric push-weights: {exc}", file=sys.stderr)
        return 2
