"""The NCCL collective (GPU): the sender broadcasts the version from its GPU to every rollout server's GPU in buckets
(1 GiB by default; FABRIC_BUCKET_BYTES), in a process group formed for this update (fabric.weights.transports.collective
says how, and what a failure does)."""

from __future__ import annotations

from fabric.weights.transports import collective

NAME = "nccl"


def unusable(offer, source) -> str | None:
    return collective.unusable(NAME, offer, source)


async def send_group(source, version, targets, timeout, report):
    return await collective.send_group(NAME, source, version, targets, timeout, report)
