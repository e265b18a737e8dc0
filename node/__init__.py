"""The veilnet node: daemon (libp2p host, protocols, HTTP API), wire format, shard store and the
``veilnet`` command line.

Importing ``node`` stays light: the client SDK uses ``node.wire`` and ``node.p2p`` without
loading the daemon (Hypercorn, FastAPI).
"""

from node.config import ConfigError, NodeConfig, load_config
from node.store import ShardStore, StoreError
from node.wire import DEFAULT_FRAME_LIMIT, WIRE_VERSION, WireError

__all__ = [
    "DEFAULT_FRAME_LIMIT",
    "WIRE_VERSION",
    "ConfigError",
    "NodeConfig",
    "ShardStore",
    "StoreError",
    "WireError",
    "load_config",
]
