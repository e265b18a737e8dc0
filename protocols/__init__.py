"""The wire: the frame codec (``protocols.wire``), transport helpers (``protocols.transport``)
and one module per libp2p protocol of docs/protocol.md, each with its typed messages, the
caller's half (send a request, check the answer) and what the serving side needs to parse and
answer:

=====================  ======================  ===========================================
protocol id            module                  what it does
=====================  ======================  ===========================================
/veilnet/infer/1       protocols.infer             run a shard on activations, signed answers
/veilnet/session/1     protocols.session           decoder sessions: the node keeps the KV cache
/veilnet/shard/1       protocols.shard             fetch a node shard or manifest by CID
/veilnet/peers/1       protocols.peers             peer hello: node records
/veilnet/cards/1       protocols.cards             look up signed agent cards
/veilnet/ledger/1      protocols.ledger            append to a ledger, read proofs and rankings
/veilnet/witness/1     protocols.witness           offer a checkpoint for cosigning
=====================  ======================  ===========================================

``node/`` serves these protocols; ``client/`` calls them. (The package is not named ``proto``:
that name belongs to proto-plus, which google-api-core installs beside us.)
"""

from protocols.cards import CARDS, CARDS_TOPIC, lookup_cards
from protocols.infer import INFER, CkksRequest, InferReply, InferRequest
from protocols.ledger import LEDGER
from protocols.peers import PEERS, PeerRecord, exchange_peers
from protocols.session import (
    SESSION,
    CloseRequest,
    KVCacheError,
    OpenRequest,
    SessionIO,
    SessionReply,
    StepRequest,
    session_io,
)
from protocols.shard import SHARD
from protocols.transport import (
    PEER_ERRORS,
    PeerUnreachable,
    RemoteError,
    make_host,
)
from protocols.wire import WIRE_VERSION, WireError
from protocols.witness import WITNESS

__all__ = [
    "CARDS", "CARDS_TOPIC", "INFER", "LEDGER", "PEERS", "PEER_ERRORS", "SESSION", "SHARD",
    "WIRE_VERSION", "WITNESS", "CkksRequest", "CloseRequest", "InferReply", "InferRequest",
    "KVCacheError", "OpenRequest", "PeerRecord", "PeerUnreachable", "RemoteError", "SessionIO",
    "SessionReply", "StepRequest", "WireError", "exchange_peers", "lookup_cards", "make_host",
    "session_io",
]
