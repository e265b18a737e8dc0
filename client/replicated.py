"""Replicated hops: run a node shard on several nodes and return only an answer that won.

Modes (docs/consensus.md):

- ``full``: the hop goes to ``replicas`` nodes at once; the first returns its outputs, the
  others only a signed fingerprint of theirs. The largest agreeing group wins if it is a strict
  majority; otherwise the hop is widened to one more node at a time until one is, or the nodes
  run out and the query fails. If the node that sent outputs lost, the outputs of a winner are
  fetched and used instead: an answer that lost is never returned.
- ``spot``: one node answers; with probability ``spot_rate`` a second node is asked for its
  fingerprint too, and a disagreement is settled by widening as above.
- ``none``: one node answers; another is tried only if it fails (the pre-consensus behaviour).

Every decided verdict updates the client's ``Reputation`` (agreement, latency, availability);
nodes that lost a decided verdict are avoided from then on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from consensus.fingerprint import Tolerance
from consensus.verdict import Answer, Verdict, decide

if TYPE_CHECKING:
    from client.async_client import AsyncClient, HopRecord
    from models import ShardSpec
    from node.peers import PeerRecord
    from node.wire import DigestEntry

MODES = ("full", "spot", "none")


@dataclass
class Reply:
    """One node's checked answer for one hop."""

    record: PeerRecord
    hop: HopRecord
    outputs: dict[str, np.ndarray] | None  # None when the node sent only its fingerprint
    out_entries: dict[str, DigestEntry] | None
    fingerprint: dict[str, Any]
    fingerprint_signature: bytes | None


async def run_hop(client: AsyncClient, shard: ShardSpec, feeds: dict[str, np.ndarray],
                  input_digest: bytes,
                  ) -> tuple[dict[str, np.ndarray], HopRecord, dict[str, DigestEntry]]:
    """The hop's outputs, the HopRecord of the node whose outputs are used (with the verdict
    attached) and the outputs' digest entries; raises QueryError."""
    from client.async_client import QueryError

    mode, rng = client.verify, client.rng
    candidates = client.plan(shard.cid)
    if not candidates:
        raise QueryError(f"hop {shard.index}: no known node serves shard {shard.cid}")
    failures: list[str] = []
    want = {"full": client.replicas, "spot": 2 if rng.random() < client.spot_rate else 1,
            "none": 1}[mode]
    replies: dict[str, Reply] = {}
    queue = list(candidates)

    async def ask(record: PeerRecord, what: str) -> None:
        try:
            with trio.fail_after(client.hop_timeout):
                reply = await client._call(record, shard, feeds, input_digest, what)
        except (Exception, trio.TooSlowError) as exc:
            from client.async_client import _describe

            failures.append(f"{record.peer_id}: {_describe(exc, client.hop_timeout)}")
            client.reputation.record_availability(record.peer_id, False)
            client.mark_failed(record.peer_id)
            return
        client.reputation.record_availability(record.peer_id, True)
        client.reputation.record_latency(record.peer_id, reply.hop.latency_ms)
        replies[record.peer_id] = reply

    # all nodes of the hop at once: the first for its outputs, the others for fingerprints;
    # a node that fails is replaced while candidates remain (the replacement is asked for
    # outputs if no answer with outputs has come yet)
    while len(replies) < want and queue:
        has_outputs = any(r.outputs is not None for r in replies.values())
        batch, queue = queue[:want - len(replies)], queue[want - len(replies):]
        async with trio.open_nursery() as nursery:
            for i, record in enumerate(batch):
                nursery.start_soon(ask, record, "fingerprint" if has_outputs or i else "outputs")
    if not replies:
        raise QueryError(f"hop {shard.index} (shard {shard.cid}): all {len(candidates)} nodes "
                         "failed: " + "; ".join(failures))
    primary = next((p for p, r in replies.items() if r.outputs is not None), None)
    verdict = _decide(client, shard, replies)
    # no strict majority: widen the hop to one more node at a time
    while not verdict.decided and queue:
        await ask(queue.pop(0), "fingerprint")
        verdict = _decide(client, shard, replies)
    if len(replies) > 1 and not verdict.decided:
        raise QueryError(f"hop {shard.index} (shard {shard.cid}): no majority among "
                         f"{len(replies)} answers ({verdict.reason}); nothing is returned")
    for node in verdict.winners if len(replies) > 1 else ():
        client.reputation.record_verdict(node, True)
    for node in verdict.losers:
        client.reputation.record_verdict(node, False)
        client.caught.add(node)
    if primary is not None and primary in verdict.winners:
        chosen = replies[primary]
    else:  # the outputs we hold lost, or every node asked for outputs failed: a winner's
        chosen = await _winner_outputs(client, shard, feeds, input_digest, verdict, replies)
    record = {"mode": mode, "nodes": list(replies), "winners": list(verdict.winners),
              "losers": list(verdict.losers), "decided": verdict.decided,
              "reason": verdict.reason,
              "answers": {p: {"output_digest": r.hop.output_digest,
                              "signature": r.hop.signature, "request_id": r.hop.request_id,
                              "fingerprint_signature": (r.fingerprint_signature or b"").hex()}
                          for p, r in replies.items()}}
    hop = replace(chosen.hop, attempts=len(replies) + len(failures), failures=tuple(failures),
                  verdict=record if len(replies) > 1 else None)
    assert chosen.outputs is not None and chosen.out_entries is not None
    return chosen.outputs, hop, chosen.out_entries


def _decide(client: AsyncClient, shard: ShardSpec, replies: dict[str, Reply]) -> Verdict:
    answers = [Answer(p, r.fingerprint, r.outputs) for p, r in replies.items()]
    return decide(answers, client.tolerance)


async def _winner_outputs(client: AsyncClient, shard: ShardSpec, feeds: dict[str, np.ndarray],
                          input_digest: bytes, verdict: Verdict,
                          replies: dict[str, Reply]) -> Reply:
    """Full outputs from a winner, checked to agree with the winning fingerprint."""
    from client.async_client import QueryError
    from consensus.fingerprint import fingerprints_agree

    reference = replies[verdict.winners[0]].fingerprint
    for node in verdict.winners:
        try:
            with trio.fail_after(client.hop_timeout):
                reply = await client._call(replies[node].record, shard, feeds, input_digest)
        except (Exception, trio.TooSlowError):
            continue
        if fingerprints_agree(reply.fingerprint, reference, client.tolerance)[0]:
            return reply
        client.caught.add(node)
    raise QueryError(f"hop {shard.index}: no winning node sent outputs matching the verdict")


def plan(candidates: list[PeerRecord], score: Any, caught: set[str], rng: random.Random,
         exploration: float = 0.2) -> list[PeerRecord]:
    """Candidates ordered by reputation with some randomness (so new nodes get traffic), nodes
    caught lying last (used only when nothing else serves the shard)."""
    honest = [r for r in candidates if r.peer_id not in caught]
    liars = [r for r in candidates if r.peer_id in caught]
    keyed = sorted(honest, key=lambda r: -(score(r.peer_id) + rng.uniform(0, exploration)))
    return keyed + liars


__all__ = ["MODES", "Reply", "Tolerance", "plan", "run_hop"]
