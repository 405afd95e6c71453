"""A small TCP proxy for fault injection: sits between two fabric processes on loopback and can slow, cut or
freeze the link. It runs its own asyncio loop in a thread, so sync tests, async tests and subprocesses can all
go through it.

    with TcpProxy("127.0.0.1:50051") as proxy:      # proxy.address forwards to the target
        proxy.cut_after(200_000)                     # drop every connection once 200 kB more went upstream
        proxy.freeze()                               # stop forwarding, keep sockets open (a dead peer)
        proxy.freeze_after_next_reply()              # the same, right after the target next sends anything
"""

from __future__ import annotations

import asyncio
import threading
import time

PUMP_BYTES = 16 * 1024


class TcpProxy:
    def __init__(self, target: str, rate_bytes_per_s: float | None = None):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.rate = rate_bytes_per_s  # upstream (client -> target) throttle; None: full speed
        self.bytes_up = 0
        self.bytes_down = 0
        self.cuts = 0
        self._cut_at: int | None = None
        self._refuse = False
        self._refuse_after_cut = True
        self._flowing: asyncio.Event | None = None
        self._freeze_after_reply = False
        self.frozen_at: float | None = None  # time.monotonic() of the last freeze
        self._conns: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self.address = ""

    # ---- control (any thread) ----

    def start(self) -> TcpProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def close(self) -> None:
        self._call(self._shutdown)
        self._thread.join(10)

    def cut(self, refuse: bool = False) -> None:
        """Resets every open connection; with refuse, new ones are reset on arrival until restore()."""
        self._refuse = refuse
        self._call(self._cut_all)

    def cut_after(self, upstream_bytes: int, refuse: bool = True) -> None:
        """Cuts once `upstream_bytes` more bytes have gone from the clients to the target."""
        self._refuse_after_cut = refuse
        self._cut_at = self.bytes_up + upstream_bytes

    def freeze(self) -> None:
        """Stops moving bytes both ways but keeps the sockets open: the peer looks alive to TCP and silent."""
        self._call(self._freeze)

    def freeze_after_next_reply(self) -> None:
        """Arms a freeze that the proxy's own loop fires right after it forwards the target's next bytes: the peer
        goes silent mid-conversation, at a point that does not depend on how fast the test reads its replies."""
        self._freeze_after_reply = True

    def restore(self) -> None:
        self._refuse = False
        self._cut_at = None
        self._call(self._flowing.set)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the loop ----

    def _call(self, fn) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._ready.set()
        async with server:
            await self._stop.wait()
            self._cut_all()
        for task in list(self._pumps):  # the connection handlers then return on their own
            task.cancel()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=5)

    def _freeze(self) -> None:
        self._flowing.clear()
        self.frozen_at = time.monotonic()

    def _shutdown(self) -> None:
        self._stop.set()

    def _cut_all(self) -> None:
        if self._conns:
            self.cuts += 1
        for writer in list(self._conns):
            writer.transport.abort()  # RST, as a killed host or a pulled cable looks to the other end
        self._conns.clear()

    async def _accept(self, client_reader, client_writer) -> None:
        if self._refuse:
            client_writer.transport.abort()
            return
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self._conns.update((client_writer, target_writer))
        up = asyncio.create_task(self._pump(client_reader, target_writer, upstream=True))
        down = asyncio.create_task(self._pump(target_reader, client_writer, upstream=False))
        self._pumps.update((up, down))
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
            self._pumps.discard(task)
        for writer in (client_writer, target_writer):
            self._conns.discard(writer)
            writer.transport.abort()

    async def _pump(self, reader, writer, upstream: bool) -> None:
        while True:
            data = await reader.read(PUMP_BYTES)
            if not data:
                return
            await self._flowing.wait()
            if upstream and self._cut_at is not None and self.bytes_up + len(data) >= self._cut_at:
                self._cut_at = None
                self._refuse = self._refuse_after_cut
                self._cut_all()
                return
            writer.write(data)
            await writer.drain()
            if upstream:
                self.bytes_up += len(data)
                if self.rate:
                    await asyncio.sleep(len(data) / self.rate)
            else:
                self.bytes_down += len(data)
                if self._freeze_after_reply:
                    self._freeze_after_reply = False
                    self._freeze()
