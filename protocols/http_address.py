"""``HOST:PORT`` addresses of veilnet's HTTP servers (a node's API, ``veilnet gateway``), parsed
and handed to hypercorn the same way everywhere. No libp2p here: node/config.py imports it."""

from __future__ import annotations


def split_host_port(value: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT`` (an IPv6 host in brackets, which are dropped), or None
    when ``value`` is not of that form or the port is above 65535."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    # ASCII digits only: str.isdigit() also takes "²" (int() refuses it) and "٣" (read as 3)
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        return None
    return host, int(port)


def hypercorn_bind(host: str, port: int) -> str:
    """The bind string hypercorn takes for ``host`` and ``port`` (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["hypercorn_bind", "split_host_port"]
