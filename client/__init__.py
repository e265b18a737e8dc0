"""The client SDK: encrypted queries through veilnet nodes.

``Client`` (blocking) and ``AsyncClient`` (trio) run the deployment's client head and tail
locally, send each node shard's transformed activations to a node serving it, verify every node
signature and retry a failed hop on another node.
"""

from client.async_client import AsyncClient, EmbedResult, HopRecord, QueryError
from client.sync_client import Client

__all__ = ["AsyncClient", "Client", "EmbedResult", "HopRecord", "QueryError"]
