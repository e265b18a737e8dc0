"""Agent cards (A2A v1.0), their verification and index, the A2A JSON-RPC dispatcher and the
ANP documents (DID document, Agent Description, CollectionPage). See docs/agent-card.md."""

from registry.a2a_rpc import InferFailed, dispatch
from registry.anp import agent_description, collection_page, did_document, did_wba
from registry.card import (
    EXTENSION_URI,
    REASONS,
    CardInfo,
    CardRejected,
    ServedShard,
    build_card,
    card_ttl,
    extension_params,
    parse_card_json,
    sign_card,
    verify_card,
)
from registry.index import CardIndex

__all__ = [
    "EXTENSION_URI",
    "REASONS",
    "CardIndex",
    "CardInfo",
    "CardRejected",
    "InferFailed",
    "ServedShard",
    "agent_description",
    "build_card",
    "card_ttl",
    "collection_page",
    "did_document",
    "did_wba",
    "dispatch",
    "extension_params",
    "parse_card_json",
    "sign_card",
    "verify_card",
]
