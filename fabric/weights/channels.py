"""Control channels of weight updates, kept open across pushes where the caller keeps a `ChannelCache`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from fabric import security


class ChannelCache:
    """Channels to rollout servers kept open across pushes (one per server, on the event loop that opened them), so
    that an update pays no connection setup: on a colocated CUDA IPC update the control plane is most of the time.
    Without one, each call opens and closes a channel of its own."""

    def __init__(self):
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, target: str) -> grpc.aio.Channel:
        kept = self._channels.get(target)
        if kept is None:
            kept = self._channels[target] = security.channel(target)
        return kept

    async def forget(self, target: str) -> None:
        """Closes the channel to a server that went away (the next call connects afresh)."""
        kept = self._channels.pop(target, None)
        if kept is not None:
            await kept.close()

    async def close(self) -> None:
        for target in list(self._channels):
            await self.forget(target)


@contextlib.asynccontextmanager
async def open_channel(target: str, channels: ChannelCache | None = None) -> AsyncIterator[grpc.aio.Channel]:
    """The kept channel to `target` when there is a cache, else a channel for this call only."""
    if channels is not None:
        yield channels.get(target)
        return
    async with security.channel(target) as channel:
        yield channel
