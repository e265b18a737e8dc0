"""``SessionHop``: one node shard of a generation, served by sessions on nodes that keep its KV
cache (/veilnet/session/1, docs/protocol.md), checked the way the ``VerifyPolicy`` says.

- ``none``: one node holds the session. ``spot``: one node, and at each step with probability
  ``spot_rate`` a second node replays the hop's inputs so far in a fresh session and its
  answer for this step is compared; a disagreement is settled by a third node as in full mode
  (the loser is dropped), and one winner's session is kept. ``full``: ``replicas`` nodes hold
  a session each and step together; at every step their outputs are compared and the strict
  majority wins (``consensus.decide``); a node that diverges loses the verdict, is reported to the
  ``Router`` and dropped for the rest of the generation.
- A node that fails (timeout, error, lost session) is dropped and replaced: the hop's inputs
  so far are *replayed* into a new session on another node serving the shard (one open with
  every earlier input concatenated along the sequence axis), whose answer for the last
  positions is this step's. Greedy generation continues with the same tokens.

The client keeps every input it sent for the hop (the residual stream, ``seq x d`` floats per
token: 2.3 KB per token for SmolLM2) so it can replay.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import trio
from libp2p.abc import IHost

from client.health import describe
from client.results import QueryError, SessionHopRecord
from client.router import Router
from client.streams import StreamPool
from consensus.fingerprint import fingerprint
from consensus.verdict import Answer, decide
from models import ShardSpec
from models.decoding import DecoderLayout
from models.pipeline import Tensors
from protocols.peers import PeerRecord
from protocols.session import (
    SESSION,
    CloseRequest,
    OpenRequest,
    SessionReply,
    StepRequest,
    check_reply,
)
from protocols.transport import PEER_ERRORS, RemoteError, ensure_connected
from protocols.wire import tensors_digest

log = logging.getLogger("veilnet.client")


class SessionCaller:
    """Opens, steps and closes sessions on nodes from one libp2p host."""

    def __init__(self, host: IHost, streams: StreamPool, connect_timeout: float) -> None:
        self.host, self.streams, self.connect_timeout = host, streams, connect_timeout

    async def _send(self, node: PeerRecord, message: dict[str, Any]) -> dict[str, Any]:
        peer = await ensure_connected(self.host, node.peer_id, node.addrs, self.connect_timeout)
        return await self.streams.request(peer, SESSION, message)

    async def open(self, node: PeerRecord, shard: ShardSpec, layout: DecoderLayout,
                   feeds: Tensors) -> SessionReply:
        request = OpenRequest(secrets.token_hex(16), shard.cid, feeds)
        response = await self._send(node, request.to_message())
        return check_reply(response, request, tensors_digest(feeds), node.peer_id, shard,
                           layout.hop_outputs(shard))

    async def step(self, node: PeerRecord, shard: ShardSpec, layout: DecoderLayout,
                   session: str, feeds: Tensors, position: int) -> SessionReply:
        """One step on ``session``, whose cache the node must hold at ``position`` tokens."""
        request = StepRequest(secrets.token_hex(16), session, feeds, position)
        response = await self._send(node, request.to_message())
        return check_reply(response, request, tensors_digest(feeds), node.peer_id, shard,
                           layout.hop_outputs(shard))

    async def close(self, node: PeerRecord, session: str) -> None:
        """Best effort: a node that is gone has dropped the session anyway."""
        request = CloseRequest(secrets.token_hex(16), session)
        try:
            with trio.move_on_after(self.connect_timeout):
                await self._send(node, request.to_message())
        except Exception as exc:  # closing is best effort
            log.debug("closing session on %s: %s", node.peer_id, exc)


@dataclass
class _Member:
    node: PeerRecord
    session: str


class SessionHop:
    """One node shard for one generation; ``await hop(feeds)`` is one step (see module doc)."""

    def __init__(self, caller: SessionCaller, router: Router, policy: Any, shard: ShardSpec,
                 layout: DecoderLayout) -> None:
        self.caller, self.router, self.policy = caller, router, policy
        self.shard, self.layout = shard, layout
        self.wanted = policy.replicas if policy.mode == "full" else 1
        self.history: list[Tensors] = []
        self.position = 0  # tokens in the sessions' caches
        self.members: list[_Member] = []
        self.used: dict[str, PeerRecord] = {}  # every node that held a session, in order
        self.excluded: set[str] = set()  # failed or lost during this generation
        self.expired: set[str] = set()  # lost our session once (replayed there if needed)
        self.failures: list[str] = []
        self.verdicts: list[dict[str, Any]] = []
        self.unverified: str | None = None
        self.replays = 0  # sessions re-opened on another node after a failure
        self.checks = 0  # sessions opened with the history to check or settle a step
        self.latency_ms = 0.0
        self._chain = hashlib.sha256(b"veilnet-session-chain/1")
        self._last: tuple[PeerRecord, SessionReply] | None = None

    @property
    def holders(self) -> list[str]:
        """PeerIDs of the nodes holding this hop's session now."""
        return [m.node.peer_id for m in self.members]

    # -- one step ---------------------------------------------------------------------------------

    async def __call__(self, feeds: Tensors) -> Tensors:
        started = time.perf_counter()
        answers: dict[str, tuple[_Member, SessionReply]] = {}
        await self._ask([(m, None) for m in self.members], feeds, answers)
        base = self.wanted
        if self.policy.mode == "spot" and self.router.rng.random() < self.policy.spot_rate:
            base = 2  # this step also on a second node (a replay), as in full mode
        want, checking = base, base > self.wanted
        while True:
            missing = want - len(answers)
            fresh = self._candidates(missing, checking) if missing > 0 else []
            if fresh:
                # a node that failed is replaced (a replay); one more node settles a tie or
                # spot-checks (a check)
                await self._ask([(None, n) for n in fresh], feeds, answers,
                                check=checking or len(answers) >= self.wanted)
                continue  # until ``want`` answered or no node is left to ask
            if not answers:
                raise QueryError(f"hop {self.shard.index} ({self.shard.cid[:16]}…): no node "
                                 "answered:\n  " + "\n  ".join(self.failures[-8:]
                                                                or ["no node serves it"]))
            winners = await self._decide(answers, want)
            if winners is not None:
                break
            want, checking = len(answers) + 1, True  # undecided: ask one more node
        member, reply = answers[winners[0]]
        if self.policy.mode != "full":
            await self._keep_one(member)
        self.history.append(dict(feeds))
        self.position = reply.position
        self._chain.update(reply.input_digest + reply.output_digest)
        self._last = (member.node, reply)
        self.latency_ms += (time.perf_counter() - started) * 1e3
        assert reply.outputs is not None
        return dict(reply.outputs)

    async def _keep_one(self, keep: _Member) -> None:
        """Close the sessions a spot check opened, keeping ``keep`` (the primary if it won)."""
        for member in [m for m in self.members if m is not keep]:
            self.members.remove(member)
            await self.caller.close(member.node, member.session)

    def _candidates(self, n: int, checking: bool = False) -> list[PeerRecord]:
        """Up to ``n`` nodes not holding or excluded from this hop: by rank, or for a check
        drawn uniformly (``Router.audit_order``); then, when those are too few, the holders
        in backoff after a failure, soonest back first (the hop's reserve, as in
        ``replicated.run_hop``: a node that was down a moment ago, or refused another shard,
        must not leave a step with one answer while it is up again)."""
        busy = {m.node.peer_id for m in self.members} | self.excluded
        planned = self.router.plan(self.shard.cid)
        free = [r for r in planned if r.peer_id not in busy]
        ordered = self.router.audit_order(free) if checking else free
        if len(ordered) < n:
            ordered += [r for r in self.router.backed_off(self.shard.cid, planned)
                        if r.peer_id not in busy]
        return ordered[:n]

    async def _ask(self, asks: list[tuple[_Member | None, PeerRecord | None]], feeds: Tensors,
                   answers: dict[str, tuple[_Member, SessionReply]], *,
                   check: bool = False) -> None:
        """Step the given members, or open (replaying the history) on the given nodes, all at
        once; answers land in ``answers``, failures drop the member. Opening with a history
        counts as a replay, or with ``check`` as a check."""
        if self.history:
            opened = sum(1 for m, _ in asks if m is None)
            if check:
                self.checks += opened
            else:
                self.replays += opened

        async def one(member: _Member | None, node: PeerRecord | None) -> None:
            record = member.node if member else node
            assert record is not None
            t0 = time.perf_counter()
            try:
                with trio.fail_after(self.policy.hop_timeout):
                    if member is not None:
                        reply = await self.caller.step(record, self.shard, self.layout,
                                                       member.session, feeds, self.position)
                    else:
                        reply = await self._open(record, feeds)
                        member = _Member(record, reply.session)
                        self.members.append(member)
                        self.used.setdefault(record.peer_id, record)
            except RemoteError as exc:
                # the node expired or lost the session (idle expiry, a restart): it is not at
                # fault, so the session is replayed and it may take it again
                expired = exc.code == "unknown_session" and member is not None
                self._drop(record, describe(exc, self.policy.hop_timeout), expired=expired)
                return
            except (*PEER_ERRORS, QueryError) as exc:
                self._drop(record, describe(exc, self.policy.hop_timeout))
                return
            self.router.answered(record.peer_id, (time.perf_counter() - t0) * 1e3)
            answers[record.peer_id] = (member, reply)

        async with trio.open_nursery() as nursery:
            for member, node in asks:
                nursery.start_soon(one, member, node)

    async def _open(self, node: PeerRecord, feeds: Tensors) -> SessionReply:
        """A session on ``node`` holding this hop's cache: the history replayed, then ``feeds``;
        the reply's outputs are cut to ``feeds``' positions."""
        if not self.history:
            return await self.caller.open(node, self.shard, self.layout, feeds)
        t = {n: v.shape[1] for n, v in feeds.items()}
        joined = {n: np.concatenate([h[n] for h in self.history] + [v], axis=1)
                  for n, v in feeds.items()}
        reply = await self.caller.open(node, self.shard, self.layout, joined)
        last = min(t.values())
        assert reply.outputs is not None
        outputs = {n: np.ascontiguousarray(v[:, -last:]) for n, v in reply.outputs.items()}
        return replace(reply, outputs=outputs, fingerprint=fingerprint(outputs))

    def _drop(self, node: PeerRecord, reason: str, *, lost: bool = False,
              expired: bool = False) -> None:
        self.members = [m for m in self.members if m.node.peer_id != node.peer_id]
        line = f"{node.peer_id}: {reason}"
        self.failures.append(line)
        if expired and node.peer_id not in self.expired:
            self.expired.add(node.peer_id)  # once: a second loss counts as a failure
        else:
            self.excluded.add(node.peer_id)
            if not lost:
                self.router.failed(node.peer_id, reason)
        log.warning("hop %d: dropped %s", self.shard.index, line)

    async def _decide(self, answers: dict[str, tuple[_Member, SessionReply]],
                      want: int) -> list[str] | None:
        """The winners among ``answers`` (None: undecided, ask one more node)."""
        if len(answers) == 1 and (self.policy.mode != "full" or want <= 1):
            return [next(iter(answers))]  # none, or spot without a check
        votes = [Answer(p, r.fingerprint, r.outputs) for p, (_, r) in answers.items()]
        verdict = decide(votes, self.policy.tolerance)
        step = len(self.history)
        if verdict.decided and len(votes) >= 2:
            if verdict.losers:
                self.router.verdict(verdict.winners, verdict.losers)
                self.verdicts.append({"step": step, **verdict.to_json()})
                for loser in verdict.losers:
                    member, _ = answers.pop(loser)
                    self._drop(member.node, f"lost the verdict at step {step}", lost=True)
                    await self.caller.close(member.node, member.session)
            return sorted(verdict.winners, key=lambda p: p not in self._primary())
        if self._candidates(1):
            return None
        if len(votes) == 1 and self.policy.allow_unverified:
            self.unverified = (f"only one node answered at step {step}; "
                               + "; ".join(self.failures[-3:]))
            return [votes[0].node]
        raise QueryError(
            f"hop {self.shard.index}: no verified answer at step {step} "
            f"({verdict.reason if len(votes) > 1 else 'only one node answered'}; "
            f"{len(self.router.providers(self.shard.cid))} known to serve it); "
            + "; ".join(self.failures[-4:]))

    def _primary(self) -> set[str]:
        """The node whose answers were used last (kept as the one session in spot mode)."""
        return {self._last[0].peer_id} if self._last is not None else set()

    # -- end --------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        for member in self.members:
            await self.caller.close(member.node, member.session)
        self.members = []

    def record(self) -> SessionHopRecord:
        if self._last is None:
            raise QueryError(f"hop {self.shard.index} never answered")
        node, reply = self._last
        verified = self.policy.mode == "full" and self.unverified is None
        return SessionHopRecord(
            shard_index=self.shard.index, shard_cid=self.shard.cid, node_did=node.did,
            peer_id=node.peer_id, nodes=tuple(self.used),
            node_dids=tuple(r.did for r in self.used.values()),
            steps=len(self.history), replays=self.replays, checks=self.checks,
            latency_ms=round(self.latency_ms, 3),
            request_id=reply.request_id, input_digest=reply.input_digest.hex(),
            output_digest=reply.output_digest.hex(), signature=reply.signature.hex(),
            chain=self._chain.hexdigest(), session=reply.session,
            position_before=reply.position_before, failures=tuple(self.failures),
            verdicts=tuple(self.verdicts), verified=verified,
            unverified_reason=self.unverified if self.policy.mode == "full"
            else f"verify={self.policy.mode}")


__all__ = ["SessionCaller", "SessionHop"]
