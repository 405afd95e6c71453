"""The gloo collective (CPU): the NCCL path's protocol over TCP, so CI exercises negotiation, group lifetime, a peer
killed mid-broadcast, fallback and re-admission with real servers. `auto` never picks it: on CPU hosts the raw-TCP
data plane relays down a chain at one copy of egress, where a gloo broadcast costs the sender one copy per server."""

from __future__ import annotations

from fabric.weights.transports import collective

NAME = "gloo"


def unusable(offer, source) -> str | None:
    return collective.unusable(NAME, offer, source)


async def send_group(source, version, targets, timeout, report):
    return await collective.send_group(NAME, source, version, targets, timeout, report)
