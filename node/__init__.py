"""The veilnet node: the daemon (a libp2p host serving the protocols of ``protocols/``, the HTTP
API), the shard store and executor, config, and the ``veilnet`` command line. The client SDK
never imports it.
"""

from node.config import ConfigError, NodeConfig, load_config
from node.store import ShardStore, StoreError

__all__ = [
    "ConfigError",
    "NodeConfig",
    "ShardStore",
    "StoreError",
    "load_config",
]
