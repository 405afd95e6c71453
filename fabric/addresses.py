"""HOST:PORT addresses as the fabric writes them (IPv6 hosts in brackets: [::1]:50051)."""

from __future__ import annotations


def host_of(address: str, default: str = "127.0.0.1") -> str:
    return address.rpartition(":")[0].strip("[]") or default
