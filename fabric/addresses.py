"""HOST:PORT addresses as the fabric writes them (IPv6 hosts in brackets: [::1]:50051)."""

from __future__ import annotations


def split_address(address: str) -> tuple[str, int]:
    """("host", port); ValueError naming the address when it has no numeric port."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def host_of(address: str, default: str = "127.0.0.1") -> str:
    return address.rpartition(":")[0].strip("[]") or default
