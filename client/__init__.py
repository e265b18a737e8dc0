"""The client SDK: encrypted queries through veilnet nodes.

``Client`` (blocking) and ``AsyncClient`` (trio) run the deployment's client head and tail
locally, send each node shard's transformed activations to nodes serving it, cross-check their
answers (``verify``), verify every node signature, retry a failed hop on another node, and log
each query's receipt and score report at a ledger node when one is known.
"""

from client.async_client import AsyncClient
from client.deployment import SecretFileError
from client.receipts import LedgerReceipt, PendingReceipt, ReceiptError, ReceiptPending
from client.replicated import VerifyPolicy
from client.results import EmbedResult, HopRecord, QueryError
from client.router import Router
from client.sync_client import Client

__all__ = ["AsyncClient", "Client", "EmbedResult", "HopRecord", "LedgerReceipt",
           "PendingReceipt", "QueryError", "ReceiptError", "ReceiptPending", "Router",
           "SecretFileError", "VerifyPolicy"]
