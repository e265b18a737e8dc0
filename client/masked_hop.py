"""Masked offload (``masked/1``): the client's half of one node-shard call.

A masked deployment's node shards are bare linear layers (``x W``, float64) on public weights.
For each call the client draws a fresh seed from the OS CSPRNG and the Gaussian mask ``r`` it
expands to (crypto/masks.py, ``sigma`` from the manifest: models/masked.py), then at once:

- node A gets ``x + r`` and returns ``(x + r) W``;
- node B gets only the seed (a ``mask-seed`` request, protocols/infer.py), draws ``r`` itself
  and returns ``r W``. B never sees ``x + r``, A never sees ``r``.

Both answers are checked with Freivalds' test against the client's secret vectors
(consensus/freivalds.py) before anything uses them; the client returns ``(x + r) W - r W``.
A node whose product fails the check is caught (a lost verdict: avoided from then on, its
reputation drops); a node that fails or times out is backed off. Either way the call is made
again with a fresh mask on another pair, up to ``ATTEMPTS`` pairs: an answer that failed its
check is never used.

Pairs: A and B must be run by different operators as far as the client can tell: different
DIDs, no common multiaddr, and no common non-loopback IP address. Privacy rests on the two not
colluding (docs/threat-model.md): together they hold ``x + r`` and ``r``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import multiaddr
import numpy as np
import trio

from client.caller import InferCaller, Reply
from client.health import describe
from client.replicated import VerifyPolicy
from client.results import HopRecord, QueryError
from client.router import Router
from consensus.freivalds import FreivaldsCheck, ProductCheck
from crypto.masks import new_seed
from models import Manifest, ShardSpec
from models.masked import mask_sigma, node_weight
from protocols.infer import MaskSeed, seeds_digest
from protocols.peers import PeerRecord
from protocols.transport import PEER_ERRORS
from protocols.wire import tensors_digest

log = logging.getLogger("veilnet.client")
ATTEMPTS = 3  # pairs tried for one call before the hop fails
Tensors = dict[str, np.ndarray]
T = TypeVar("T")


def _hosts(record: PeerRecord) -> set[str]:
    """The non-loopback IP addresses in a node's multiaddrs."""
    hosts = set()
    for addr in record.addrs:
        try:
            parts = multiaddr.Multiaddr(addr)
            for proto in ("ip4", "ip6"):
                try:
                    ip = ipaddress.ip_address(parts.value_for_protocol(proto))
                except Exception:  # the address has no such part
                    continue
                if not ip.is_loopback and not ip.is_unspecified:
                    hosts.add(str(ip))
        except Exception:  # a malformed address says nothing
            continue
    return hosts


def separate_operators(a: PeerRecord, b: PeerRecord) -> bool:
    """Whether ``a`` and ``b`` may form a pair: different DIDs and PeerIDs, no common address,
    no common non-loopback IP (nodes of one local testnet share only 127.0.0.1)."""
    return (a.did != b.did and a.peer_id != b.peer_id and not set(a.addrs) & set(b.addrs)
            and not _hosts(a) & _hosts(b))


def partner(candidates: list[PeerRecord], b: PeerRecord,
            exclude: set[str]) -> PeerRecord | None:
    """The best-ranked A of ``candidates`` (a plan, best first) for mask node ``b``: not
    excluded, and of another operator than ``b``; None when there is none."""
    return next((c for c in candidates if c.peer_id not in exclude
                 and separate_operators(c, b)), None)


INLINE_VALUES = 1 << 16  # below this many values, numpy work runs on the event loop


async def _off_loop(fn: Callable[..., T], *args: Any, size: int | None = None) -> T:
    """``fn(*args)`` in a worker thread, or inline when its arrays are small: a thread hop
    costs more than checking a 16-row product (measured: 24 of them per query)."""
    if size is None:
        size = sum(a.size for a in args if isinstance(a, np.ndarray))
    if size <= INLINE_VALUES:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


def _seeds(name: str, seed: bytes, shape: tuple[int, int], sigma: float,
           ) -> dict[str, MaskSeed]:
    return {name: MaskSeed(seed, shape, sigma)}


PREFETCH = 6  # mask products asked for ahead of the hop that needs them (memory bound)


@dataclass
class _Mask:
    """One call's mask and, once node B answered and passed its check, ``r W``."""

    seed: bytes
    r: np.ndarray | None = None  # drawn in a worker thread when the mask is asked for
    node: PeerRecord | None = None
    reply: Reply | None = None
    check: ProductCheck | None = None
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class QueryMasks:
    """One query's prefetched masks (by shard CID), hop-done events and failures so far."""

    ahead: dict[str, _Mask] = field(default_factory=dict)
    slots: dict[str, trio.Event] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)


class MaskedRunner:
    """Runs the node shards of one masked deployment for an ``AsyncClient``.

    ``r`` does not depend on ``x``, so node B's products are asked for ahead: ``query``
    starts, for each node shard in order, drawing the mask and asking a B node for ``r W``
    (at most ``PREFETCH`` ahead of the hop being run); ``run`` then needs only node A's
    round trip. A B product that failed or did not pass its check is replaced by a fresh
    mask on a fresh pair, as is a failed A."""

    def __init__(self, manifest: Manifest, caller: InferCaller, router: Router,
                 policy: VerifyPolicy) -> None:
        self.manifest, self.caller, self.router, self.policy = manifest, caller, router, policy
        self._checks: dict[str, FreivaldsCheck] = {}

    async def _check(self, shard: ShardSpec) -> FreivaldsCheck:
        """The shard's Freivalds check: fresh secret vectors per client, made on first use."""
        check = self._checks.get(shard.cid)
        if check is None:
            weight = await trio.to_thread.run_sync(node_weight, self.manifest, shard)
            check = await trio.to_thread.run_sync(FreivaldsCheck, weight)
            self._checks[shard.cid] = check
        return check

    @contextlib.asynccontextmanager
    async def query(self, rows: int) -> AsyncIterator[QueryMasks]:
        """Within it, the mask products of a query over ``rows`` rows are fetched ahead; pass
        what it yields to ``run``."""
        shards = self.manifest.node_shards
        # hop i done (or failed): the mask of hop i + PREFETCH may be drawn and asked for
        state = QueryMasks({s.cid: _Mask(new_seed()) for s in shards},
                           {s.cid: trio.Event() for s in shards}, {s.cid: [] for s in shards})
        try:
            async with trio.open_nursery() as nursery:
                for i, shard in enumerate(shards):
                    after = state.slots[shards[i - PREFETCH].cid] if i >= PREFETCH else None
                    nursery.start_soon(self._prefetch, state, shard, rows, after)
                try:
                    yield state
                finally:
                    nursery.cancel_scope.cancel()  # a failed query leaves nothing running
        except BaseExceptionGroup as group:
            # the query's own error (a QueryError raised in the with-body) leaves the nursery
            # wrapped in a group: callers get it as itself
            _, rest = group.split(trio.Cancelled)
            if rest is not None and len(rest.exceptions) == 1 \
                    and not isinstance(rest.exceptions[0], BaseExceptionGroup):
                raise rest.exceptions[0] from None
            raise

    @staticmethod
    async def _draw(mask: _Mask, seed: MaskSeed) -> None:
        mask.r = await _off_loop(seed.expand, size=math.prod(seed.shape))

    async def _prefetch(self, state: QueryMasks, shard: ShardSpec, rows: int,
                        after: trio.Event | None) -> None:
        mask = state.ahead[shard.cid]
        try:
            if after is not None:
                await after.wait()
            await self._ask_b(state, shard, mask, rows, set())
        finally:
            mask.done.set()

    async def _ask_b(self, state: QueryMasks, shard: ShardSpec, mask: _Mask, rows: int,
                     exclude: set[str]) -> None:
        """Draw the mask and ask the best B candidate for ``r W``; on success ``mask.reply``
        and ``mask.check`` are set (a failed or lying B is reported and left unset)."""
        (in_spec,), (out_spec,) = shard.inputs, shard.outputs
        sigma = mask_sigma(self.manifest, shard)
        width = in_spec.shape[-1]
        assert isinstance(width, int)
        seeds = _seeds(in_spec.name, mask.seed, (rows, width), sigma)
        candidates = [c for c in self.router.plan(shard.cid) if c.peer_id not in exclude]
        if not candidates:
            return
        node = mask.node = candidates[0]
        outcome: list[Reply | BaseException] = []

        async def call() -> None:
            try:
                with trio.fail_after(self.policy.hop_timeout):
                    outcome.append(await self.caller.call_seeded(node, shard, seeds,
                                                                 seeds_digest(seeds)))
            except PEER_ERRORS as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:  # draw r while B draws it too
            nursery.start_soon(self._draw, mask, seeds[in_spec.name])
            await call()
        reply = outcome[0]
        if not isinstance(reply, Reply):
            self._failed(state, shard, node, describe(reply, self.policy.hop_timeout))
            return
        self.router.answered(node.peer_id, reply.hop.latency_ms)
        check = await self._check(shard)
        result = await _off_loop(check.check, mask.r,
                                 reply.outputs[out_spec.name])  # type: ignore[index]
        if not result.ok:
            self._caught(state, shard, node, result)
            return
        mask.reply, mask.check = reply, result

    def _failed(self, state: QueryMasks, shard: ShardSpec, node: PeerRecord,
                reason: str) -> None:
        state.failures.setdefault(shard.cid, []).append(f"{node.peer_id}: {reason}")
        self.router.failed(node.peer_id, reason)

    def _caught(self, state: QueryMasks, shard: ShardSpec, node: PeerRecord,
                outcome: ProductCheck) -> None:
        state.failures.setdefault(shard.cid, []).append(
            f"{node.peer_id}: caught by the Freivalds check: {outcome.describe()}")
        log.warning("hop %d (shard %s): %s returned a wrong product (%s); asking another "
                    "node", shard.index, shard.cid, node.peer_id, outcome.describe())
        self.router.verdict([], [node.peer_id])

    async def run(self, shard: ShardSpec, feeds: Tensors, state: QueryMasks | None = None,
                  ) -> tuple[Tensors, list[HopRecord]]:
        """The shard's outputs on ``feeds`` and the two hop records (A's, then B's); with the
        ``state`` of ``query``, using the mask fetched ahead."""
        state = state or QueryMasks()
        (in_spec,), (out_spec,) = shard.inputs, shard.outputs
        x = np.ascontiguousarray(feeds[in_spec.name], dtype=np.float64)
        check = await self._check(shard)
        failures = state.failures.setdefault(shard.cid, [])
        mask = state.ahead.pop(shard.cid, None)
        try:
            if mask is not None:
                await mask.done.wait()
            for _ in range(ATTEMPTS):
                exclude = {f.split(":", 1)[0] for f in failures}  # failed or caught so far
                if mask is None or mask.reply is None or mask.r is None \
                        or mask.r.shape != x.shape:
                    mask = _Mask(new_seed())
                    await self._ask_b(state, shard, mask, x.shape[0], exclude)
                    if mask.reply is None:
                        mask = None
                        continue
                assert mask.node is not None and mask.check is not None and mask.r is not None
                b = mask.node
                a = partner(self.router.plan(shard.cid), b, exclude)
                if a is None:
                    break
                masked = x + mask.r
                digest = tensors_digest({in_spec.name: masked})
                try:
                    with trio.fail_after(self.policy.hop_timeout):
                        reply = await self.caller.call(a, shard, {in_spec.name: masked},
                                                       digest)
                except PEER_ERRORS as exc:
                    self._failed(state, shard, a, describe(exc, self.policy.hop_timeout))
                    mask = None  # x + r went to a node that failed: a fresh mask
                    continue
                self.router.answered(a.peer_id, reply.hop.latency_ms)
                y_a = reply.outputs[out_spec.name]  # type: ignore[index]
                outcome = await _off_loop(check.check, masked, y_a)
                if not outcome.ok:
                    self._caught(state, shard, a, outcome)
                    mask = None
                    continue
                self.router.verdict([a.peer_id, b.peer_id], [])
                attempts = 2 + len(failures)
                b_reply = mask.reply
                hops = [self._record(reply, "masked-input", (a, b), outcome, attempts,
                                     failures),
                        self._record(b_reply, "mask-seed", (a, b), mask.check, attempts,
                                     failures)]
                return {out_spec.name: y_a - b_reply.outputs[out_spec.name]}, hops  # type: ignore[index]
        finally:
            slot = state.slots.get(shard.cid)
            if slot is not None:
                slot.set()
        known = len(self.router.providers(shard.cid))
        raise QueryError(
            f"hop {shard.index} (shard {shard.cid}): no pair of nodes of different operators "
            f"returned checked products ({known} node(s) serve the shard; masked/1 needs two "
            f"that do not share a DID or an address)" + "".join(f"\n  - {f}" for f in failures))

    @staticmethod
    def _record(reply: Reply, role: str, pair: tuple[PeerRecord, PeerRecord],
                check: ProductCheck, attempts: int, failures: list[str]) -> HopRecord:
        verdict: dict[str, Any] = {
            "mode": "masked", "check": "freivalds", "role": role,
            "nodes": [pair[0].peer_id, pair[1].peer_id],
            "winners": [pair[0].peer_id, pair[1].peer_id], "losers": [], "decided": True,
            "reason": check.describe(), "worst_ratio": round(check.worst_ratio, 6)}
        return replace(reply.hop, attempts=attempts, failures=tuple(failures), verdict=verdict,
                       verified=True, unverified_reason=None)


__all__ = ["ATTEMPTS", "MaskedRunner", "partner", "separate_operators"]
