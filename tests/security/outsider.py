"""An outsider on the machine (no token, not the trainer): finds a weight update's rendezvous in the sender's TCP
store, plants its own plan, joins the group as rank 0 and broadcasts its own bytes; or floods the store with keys to
grow the trainer's memory. Prints one line: what it did.

    python -m tests.security.outsider HOST:PORT LAYOUT_BYTES BUCKET_BYTES
    python -m tests.security.outsider flood HOST:PORT KEYS VALUE_BYTES
"""

from __future__ import annotations

import datetime
import json
import sys
import time

import torch
from torch.distributed import PrefixStore, TCPStore

from fabric.weights.transports.collective import Group, buckets


def flood(address: str, keys: int, value_bytes: int) -> int:
    host, port = address.rsplit(":", 1)
    client = TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=10))
    value = b"x" * value_bytes
    for i in range(keys):
        try:
            client.set(f"outsider/{i}", value)
        except Exception as exc:  # noqa: BLE001 - the store went away under it
            print(f"outsider: cut off after {i} keys ({type(exc).__name__})")
            return 0
    print(f"outsider: set {keys} keys of {value_bytes} bytes")
    return 0


def main() -> int:
    if sys.argv[1] == "flood":
        return flood(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    address, size, bucket_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    host, port = address.rsplit(":", 1)
    client = TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=10))
    deadline = time.monotonic() + 10
    ready = []
    while not ready and time.monotonic() < deadline:
        ready = [k for k in client.list_keys() if k.endswith("/ready/1")]
        time.sleep(0.01)
    if not ready:
        print("outsider: no update found in the store")
        return 0
    prefix = ready[0][: -len("ready/1")]
    client.set(prefix + "go", json.dumps({"ranks": {"1": 1}, "world": 2, "pg": "outsider/", "reason": ""}))
    try:
        group = Group("gloo", PrefixStore("outsider/", client), 0, 2, 6.0, host)
        payload = torch.full((size,), 0x41, dtype=torch.uint8)
        for lo, hi in buckets(size, bucket_bytes):
            if hi > lo:
                group.broadcast(payload[lo:hi])
        passed = group.vote(True, time.monotonic() + 6)
        print(f"outsider: broadcast its bytes, vote {'passed' if passed else 'failed'}")
    except Exception as exc:  # noqa: BLE001 - the server would not join: that is the point
        print(f"outsider: refused ({type(exc).__name__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
