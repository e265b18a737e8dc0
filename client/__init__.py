"""The client SDK: encrypted queries and text generation through veilnet nodes.

``Client`` (blocking) and ``AsyncClient`` (trio) run the deployment's client head and tail
locally, send each node shard's transformed activations to nodes serving it, cross-check their
answers (``verify``), verify every node signature, retry a failed hop on another node, and log
each query's receipt and score report at a ledger node when one is known. For decoder
deployments ``generate`` and ``stream`` produce text: the client embeds, samples and holds the
LM head; nodes keep the KV cache in sessions.
"""

from client.async_client import AsyncClient, GenerationStream
from client.deployment import SecretFileError
from client.generation import TokenDelta
from client.receipts import LedgerReceipt, PendingReceipt, ReceiptError, ReceiptPending
from client.replicated import VerifyPolicy
from client.results import (
    EmbedResult,
    GenerateResult,
    HopRecord,
    QueryError,
    SessionHopRecord,
)
from client.router import Router
from client.sampling import Sampler
from client.sync_client import Client, SyncGenerationStream

__all__ = ["AsyncClient", "Client", "EmbedResult", "GenerateResult", "GenerationStream",
           "HopRecord", "LedgerReceipt", "PendingReceipt", "QueryError", "ReceiptError",
           "ReceiptPending", "Router", "Sampler", "SecretFileError", "SessionHopRecord",
           "SyncGenerationStream", "TokenDelta", "VerifyPolicy"]
