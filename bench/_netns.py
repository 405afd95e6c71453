"""A small emulated cluster on one machine: hosts in network namespaces joined by rate-limited veth links.

Each host is a namespace with one veth link to a bridge in the root namespace; tc's token bucket shapes both
directions of every link, so links, not the two shared cores, bound a transfer, as in a cluster. Needs root
(iproute2). Addresses are in 10.213.0.0/24 and exist only inside this machine.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

BRIDGE = "fabbr0"
SUBNET = "10.213.0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Host:
    name: str
    ip: str

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]


class Cluster:
    def __init__(self, n_hosts: int, rate: str = "1gbit"):
        self.n_hosts = n_hosts
        self.rate = rate
        self.hosts: list[Host] = []

    @staticmethod
    def available() -> tuple[bool, str]:
        probe = subprocess.run(["ip", "netns", "add", "fabprobe"], capture_output=True, text=True)
        if probe.returncode != 0:
            return False, f"cannot create network namespaces: {probe.stderr.strip()} (needs root and iproute2)"
        _ip("netns", "del", "fabprobe", check=False)
        return True, ""

    def __enter__(self) -> Cluster:
        self.teardown()
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for i in range(self.n_hosts):
            name, outside = f"fabh{i}", f"fabv{i}"
            host = Host(name, f"{SUBNET}.{i + 1}")
            _ip("netns", "add", name)
            _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip("link", "set", outside, "master", BRIDGE)
            _ip("link", "set", outside, "up")
            inside = ["netns", "exec", name, "ip"]
            _ip(*inside, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip(*inside, "link", "set", "eth0", "up")
            _ip(*inside, "link", "set", "lo", "up")
            shape = ["qdisc", "add", "dev"]
            tbf = ["root", "tbf", "rate", self.rate, "burst", "1mb", "latency", "100ms"]
            subprocess.run(["tc", *shape, outside, *tbf], check=True, capture_output=True)
            subprocess.run(["ip", "netns", "exec", name, "tc", *shape, "eth0", *tbf], check=True, capture_output=True)
            self.hosts.append(host)
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def teardown(self) -> None:
        for i in range(max(self.n_hosts, 8)):
            _ip("netns", "del", f"fabh{i}", check=False)
            _ip("link", "del", f"fabv{i}", check=False)
        _ip("link", "del", BRIDGE, check=False)
