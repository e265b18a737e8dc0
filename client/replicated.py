"""Replicated hops: run a node shard on several nodes and return only an answer that won.

Modes (docs/consensus.md):

- ``full``: the hop goes to ``replicas`` nodes at once; the first returns its outputs, the
  others only a signed fingerprint of theirs. The largest agreeing group wins if it is a strict
  majority; otherwise the hop is widened to one more node at a time until one is, or the nodes
  run out and the query fails. If the node that sent outputs lost, the outputs of a winner are
  fetched and used instead: an answer that lost is never returned. Fewer than two answers is
  never a verdict: the hop fails (QueryError naming how many replicas answered and why the
  others did not) unless the client was made with ``allow_unverified=True``, which returns the
  answer with ``HopRecord.verified`` false and the reason.
- ``spot``: one node answers; with probability ``spot_rate`` a second node is asked for its
  fingerprint too, and a disagreement is settled by widening as above.
- ``none``: one node answers; another is tried only if it fails (the pre-consensus behaviour).

Slow and failed nodes: a node that has not answered after the hedge delay (``PeerHealth``:
a few times the median latency, at least 1 s) no longer counts; the next candidate is asked as
well and whichever answers complete the verdict first are used. When the answers in hand are
already a strict majority of ``replicas`` and only such slow nodes are outstanding, the hop
ends without them. Every answer, failure (and slow node left behind) and decided verdict is
reported to the ``Router`` (client/router.py): failed nodes are skipped for a while, nodes that
lost a decided verdict are avoided from then on.

``run_hop`` takes what it needs: the ``InferCaller`` (one checked answer from one node), the
``Router`` (who to ask, what to remember) and the ``VerifyPolicy`` (mode, replicas, timeouts).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import trio

from client.caller import InferCaller, Reply
from client.health import describe
from client.results import HopRecord, QueryError
from client.router import Router
from consensus.fingerprint import Tolerance, fingerprints_agree
from consensus.verdict import VERIFY_MODES, Answer, Verdict, decide
from errors import InputError
from models import ShardSpec
from protocols.peers import PeerRecord
from protocols.transport import PEER_ERRORS
from protocols.wire import DigestEntry

log = logging.getLogger("veilnet.client")


@dataclass
class VerifyPolicy:
    """How hops are checked (docs/consensus.md); see the module docstring."""

    mode: str = "full"
    replicas: int = 3
    spot_rate: float = 0.1
    allow_unverified: bool = False
    hop_timeout: float = 30.0  # one node's answer
    tolerance: Tolerance = field(default_factory=Tolerance)

    def __post_init__(self) -> None:
        if self.mode not in VERIFY_MODES:
            raise InputError(f"verify={self.mode!r}: use one of {', '.join(VERIFY_MODES)}")
        if self.replicas < 1 or not 0.0 <= self.spot_rate <= 1.0:
            raise InputError("replicas must be >= 1 and spot_rate between 0 and 1")
        if self.mode == "full" and self.replicas < 2:
            raise InputError("verify='full' needs replicas >= 2 (two agreeing answers); use "
                             "verify='none' for one node per hop")


@dataclass
class _Asked:
    record: PeerRecord
    what: str
    started: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    slow: bool = False  # past the hedge delay: no longer counted, another node is asked


class _HopRun:
    """The nodes asked for one hop, their answers and failures, until the verdict is done."""

    def __init__(self, caller: InferCaller, router: Router, policy: VerifyPolicy,
                 shard: ShardSpec, feeds: dict[str, np.ndarray], input_digest: bytes,
                 candidates: list[PeerRecord], want: int,
                 reserve: Sequence[PeerRecord] = ()) -> None:
        self.caller, self.router, self.policy = caller, router, policy
        self.shard, self.feeds = shard, feeds
        self.input_digest, self.want = input_digest, want
        self.queue = list(candidates)
        self.reserve = list(reserve)  # backed-off nodes: asked only when the hop needs them
        self.asked: dict[str, _Asked] = {}  # outstanding requests by peer id
        self.replies: dict[str, Reply] = {}
        self.failures: list[str] = []
        hedge = router.health.hedge_delay(policy.hop_timeout)
        self.hedge = hedge if hedge < policy.hop_timeout else math.inf

    def verdict(self) -> Verdict:
        answers = [Answer(p, r.fingerprint, r.outputs) for p, r in self.replies.items()]
        return decide(answers, self.policy.tolerance)

    async def run(self) -> None:
        send, receive = trio.open_memory_channel[tuple[str, str, Any]](math.inf)
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                for asked in self.asked.values():
                    asked.slow = asked.slow or now - asked.started >= self.hedge
                verdict = self.verdict()
                if self._complete(verdict):
                    break
                self._launch(nursery, send, verdict)
                if not self.asked:
                    break  # nothing outstanding and nobody left to ask
                wake = min((a.started + self.hedge for a in self.asked.values() if not a.slow),
                           default=math.inf)
                with trio.move_on_at(wake):
                    self._handle(*await receive.receive())
            now = trio.current_time()
            for peer, asked in self.asked.items():
                asked.scope.cancel()
                if asked.slow:  # left behind: remembered like a failure
                    self._failed(peer, f"no answer within {now - asked.started:.1f} s (the hop "
                                       "was decided without it)")
            self.asked.clear()

    def _complete(self, verdict: Verdict) -> bool:
        if not verdict.decided:
            return False
        if len(self.replies) >= self.want:
            return True
        # only slow nodes are outstanding, and the agreeing answers in hand are already a
        # strict majority of the replicas asked for (at least two when two were asked for)
        return (bool(self.asked) and all(a.slow for a in self.asked.values())
                and len(self.replies) >= min(self.want, 2)
                and 2 * len(verdict.winners) > self.want)

    def _launch(self, nursery: trio.Nursery, send: trio.MemorySendChannel[Any],
                verdict: Verdict) -> None:
        active = sum(not a.slow for a in self.asked.values())
        # up to `want` answers, replacing failed and slow nodes while candidates remain
        while self.queue and len(self.replies) + active < self.want:
            self._ask(nursery, send, self.queue.pop(0))
            active += 1
        # the others cannot give the answers a verdict needs (two; one in a mode that does not
        # check): nodes still backed off after a failure are asked rather than failing the hop
        # (a node restarted a moment ago is usually back)
        while not self.queue and self.reserve \
                and len(self.replies) + active < min(self.want, 2):
            self._ask(nursery, send, self.reserve.pop(0))
            active += 1
        # `want` answers and no strict majority: one more node at a time
        if self.queue and not active and len(self.replies) >= self.want \
                and not verdict.decided:
            self._ask(nursery, send, self.queue.pop(0))

    def _ask(self, nursery: trio.Nursery, send: trio.MemorySendChannel[Any],
             record: PeerRecord) -> None:
        has_outputs = any(r.outputs is not None for r in self.replies.values()) or any(
            a.what == "outputs" and not a.slow for a in self.asked.values())
        asked = _Asked(record, "fingerprint" if has_outputs else "outputs", trio.current_time())
        self.asked[record.peer_id] = asked
        nursery.start_soon(self._task, asked, send)

    async def _task(self, asked: _Asked, send: trio.MemorySendChannel[Any]) -> None:
        timeout = self.policy.hop_timeout
        with asked.scope:
            try:
                with trio.fail_after(timeout):
                    reply = await self.caller.call(asked.record, self.shard, self.feeds,
                                                   self.input_digest, asked.what)
            except PEER_ERRORS as exc:
                send.send_nowait(("fail", asked.record.peer_id, describe(exc, timeout)))
                return
            send.send_nowait(("ok", asked.record.peer_id, reply))

    def _handle(self, kind: str, peer: str, value: Any) -> None:
        if self.asked.pop(peer, None) is None:
            return
        if kind == "ok":
            self.router.answered(peer, value.hop.latency_ms)
            self.replies[peer] = value
        else:
            self._failed(peer, value)

    def _failed(self, peer: str, reason: str) -> None:
        self.failures.append(f"{peer}: {reason}")
        self.router.failed(peer, reason)


async def run_hop(caller: InferCaller, router: Router, policy: VerifyPolicy, shard: ShardSpec,
                  feeds: dict[str, np.ndarray], input_digest: bytes,
                  ) -> tuple[dict[str, np.ndarray], HopRecord, dict[str, DigestEntry]]:
    """The hop's outputs, the HopRecord of the node whose outputs are used (with the verdict
    attached) and the outputs' digest entries; raises QueryError."""
    mode = policy.mode
    where = f"hop {shard.index} (shard {shard.cid})"
    candidates = router.plan(shard.cid)
    reserve = router.backed_off(shard.cid, candidates)
    if not candidates:
        raise QueryError(f"hop {shard.index}: no known node serves shard {shard.cid}")
    replicas = len(candidates) + len(reserve)
    want = {"full": policy.replicas,
            "spot": 2 if router.rng.random() < policy.spot_rate else 1, "none": 1}[mode]
    if mode == "spot" and want > 1:  # the checker is drawn uniformly, not by rank
        candidates = candidates[:1] + router.audit_order(candidates[1:])
    run = _HopRun(caller, router, policy, shard, feeds, input_digest, candidates, want, reserve)
    await run.run()
    replies, failures = run.replies, run.failures
    skipped = router.skipped(shard.cid, [*candidates, *reserve[:len(reserve) - len(run.reserve)]])
    attempts = len(replies) + len(failures)  # not counting a node cancelled as not needed
    if not replies:
        raise QueryError(f"{where}: all {attempts} node(s) asked failed" + _lines(
            failures + skipped))
    primary = next((p for p, r in replies.items() if r.outputs is not None), None)
    verdict = run.verdict()
    if len(replies) > 1 and not verdict.decided:
        raise QueryError(f"{where}: no majority among {len(replies)} answers ({verdict.reason});"
                         " nothing is returned" + _lines(failures + skipped))
    verified = len(replies) > 1
    reason = None
    if not verified:
        reason = {"spot": "verify=spot: this hop was not sampled for a check",
                  "none": "verify=none: one node, not cross-checked"}.get(mode)
        if mode == "spot" and want > 1:
            reason = "verify=spot: the check was not made, no second node answered" + "".join(
                f"; {f}" for f in failures + skipped)
        if mode == "full":
            reason = (f"verify=full needs two agreeing answers, but only 1 of the {replicas} "
                      f"node(s) serving the shard answered"
                      + (" (no other node serves it)" if replicas == 1 else "")
                      + "".join(f"; {f}" for f in failures + skipped))
            if not policy.allow_unverified:
                raise QueryError(
                    f"{where}: verify=full needs two agreeing answers, but only 1 of the "
                    f"{replicas} node(s) serving the shard answered"
                    + (" (no other node serves it)" if replicas == 1 else "")
                    + "; nothing is returned (allow_unverified=True, or veilnet query "
                      "--allow-unverified, returns such an answer marked unverified)"
                    + _lines(failures + skipped))
            log.warning("%s: the answer is NOT verified: %s", where, reason)
    router.verdict(verdict.winners if verified else (), verdict.losers)
    if primary is not None and primary in verdict.winners:
        chosen = replies[primary]
    else:  # the outputs we hold lost, or every node asked for outputs failed: a winner's
        chosen = await _winner_outputs(caller, router, policy, shard, feeds, input_digest,
                                       verdict, replies, failures)
    record = {"mode": mode, "nodes": list(replies), "winners": list(verdict.winners),
              "losers": list(verdict.losers), "decided": verdict.decided,
              "reason": verdict.reason,
              "answers": {p: {"output_digest": r.hop.output_digest,
                              "signature": r.hop.signature, "request_id": r.hop.request_id,
                              "fingerprint_signature":
                                  (r.answer.fingerprint_signature or b"").hex()}
                          for p, r in replies.items()}}
    hop = replace(chosen.hop, attempts=attempts, failures=tuple(failures),
                  verdict=record if verified else None, verified=verified,
                  unverified_reason=reason)
    outputs, entries = chosen.answer.outputs, chosen.answer.out_entries
    assert outputs is not None and entries is not None
    return outputs, hop, entries


def _lines(failures: list[str]) -> str:
    """One indented line per failure (each is one line already, see health.describe)."""
    return "".join(f"\n  - {f}" for f in failures)


async def _winner_outputs(caller: InferCaller, router: Router, policy: VerifyPolicy,
                          shard: ShardSpec, feeds: dict[str, np.ndarray], input_digest: bytes,
                          verdict: Verdict, replies: dict[str, Reply],
                          failures: list[str]) -> Reply:
    """Full outputs from a winner, checked to agree with the winning fingerprint."""
    reference = replies[verdict.winners[0]].fingerprint
    for node in verdict.winners:
        try:
            with trio.fail_after(policy.hop_timeout):
                reply = await caller.call(replies[node].node, shard, feeds, input_digest)
        except PEER_ERRORS as exc:
            failures.append(f"{node}: outputs after the verdict: "
                            f"{describe(exc, policy.hop_timeout)}")
            continue
        if fingerprints_agree(reply.fingerprint, reference, policy.tolerance)[0]:
            return reply
        failures.append(f"{node}: its outputs do not match the fingerprint it won with")
        router.caught.add(node)
    raise QueryError(f"hop {shard.index}: no winning node sent outputs matching the verdict"
                     + _lines(failures))


__all__ = ["VerifyPolicy", "run_hop"]
