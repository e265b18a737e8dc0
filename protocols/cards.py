"""``/veilnet/cards/1``: look up the signed agent cards a node has indexed.

``request: {"v": 1, "id", "deployment"?: CID, "shard"?: CID, "model"?: name}``;
``response: {"v": 1, "id", "cards": [<card as JSON text>]}`` (at most ``MAX_LOOKUP_CARDS``,
newest first; docs/protocol.md and docs/agent-card.md). The answering node is not trusted: the
caller (``lookup_cards``) verifies every card itself and keeps only those that verify. Cards
also travel over gossipsub on ``CARDS_TOPIC`` (node/discovery.py).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from libp2p.abc import IHost
from libp2p.custom_types import TProtocol

from models import is_valid_cid
from protocols.transport import connect, peer_info, request
from protocols.wire import WireError, envelope
from registry.card import CardInfo, CardRejected, parse_card_json, verify_card

CARDS = TProtocol("/veilnet/cards/1")
CARDS_TOPIC = "veilnet/cards/1"
MAX_LOOKUP_CARDS = 256
MAX_FILTER_CHARS = 200
FILTERS = ("deployment", "shard", "model")  # model: a name; the others: CIDs


@dataclass(frozen=True)
class CardLookup:
    """A lookup: the cards naming this deployment, shard and model (None: any)."""

    deployment: str | None = None
    shard: str | None = None
    model: str | None = None

    def filters(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_message(self, request_id: str) -> dict[str, Any]:
        return {**envelope(request_id), **self.filters()}


def parse_lookup(message: Mapping[str, Any]) -> CardLookup:
    """The lookup in ``message``; WireError ``bad_request`` for a filter that is not a CID (or,
    for ``model``, not a non-empty name of at most ``MAX_FILTER_CHARS`` characters)."""
    filters = {}
    for key in FILTERS:
        value = message.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value or len(value) > MAX_FILTER_CHARS or (
                key != "model" and not is_valid_cid(value)):
            raise WireError("bad_request", f"{key!r} must be "
                                           f"{'a name' if key == 'model' else 'a CID'}")
        filters[key] = value
    return CardLookup(**filters)


def lookup_answer(request_id: str, cards: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The answer to a lookup: at most ``MAX_LOOKUP_CARDS`` cards as compact JSON text."""
    return {**envelope(request_id),
            "cards": [json.dumps(c, separators=(",", ":"))
                      for c in list(cards)[:MAX_LOOKUP_CARDS]]}


async def lookup_cards(host: IHost, addr: str, *, deployment: str | None = None,
                       shard: str | None = None, timeout: float = 10.0,
                       dial_timeout: float | None = None,
                       ) -> tuple[list[CardInfo], list[str]]:
    """Ask the node at ``addr`` for the cards it indexed; returns the cards that verify here
    and one reason for each that does not (the answering node is not trusted)."""
    info = peer_info(addr)
    await connect(host, info, dial_timeout or timeout)
    lookup = CardLookup(deployment or None, shard or None)
    response = await request(host, info.peer_id, CARDS, lookup.to_message(secrets.token_hex(8)),
                             timeout)
    raw = response.get("cards")
    if not isinstance(raw, list):
        raise WireError("bad_frame", "card lookup response has no 'cards' list")
    found, rejected = [], []
    for text in raw[:MAX_LOOKUP_CARDS]:
        try:
            if not isinstance(text, str):
                raise CardRejected("malformed", "a card must be JSON text")
            found.append(verify_card(parse_card_json(text)))
        except CardRejected as exc:
            rejected.append(str(exc))
    return found, rejected


__all__ = [
    "CARDS",
    "CARDS_TOPIC",
    "FILTERS",
    "MAX_LOOKUP_CARDS",
    "CardLookup",
    "lookup_answer",
    "lookup_cards",
    "parse_lookup",
]
