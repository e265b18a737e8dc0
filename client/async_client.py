"""``AsyncClient``: encrypted queries through veilnet nodes (trio).

The client is a light libp2p peer. It runs the deployment's client head and tail in-process, and
sends each node shard's transformed activations to a node that serves that shard over
/veilnet/infer/1. The EE key is folded into the client head and tail (DEPLOY/client/*.onnx): those
files ARE the secret, and the client refuses to load them when others can read them or when
they do not hash to their CIDs in the manifest (client/deployment.py); a query never reads
client/key.json, which is kept for ``veilnet model verify`` and audits.

Every response must carry a valid signature by the PeerID the client reached over Noise, over
(request id, shard CID, input digest, output digest), and finite outputs of the right names,
dtypes and ranks; anything else counts as a failed hop, and the hop is retried on another node
serving the shard. Failed and slow nodes are remembered across queries and skipped for a while
(client/health.py). Every network step has a timeout, so a call ends in a result or a
QueryError, never a hang.
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import multiaddr
import numpy as np
import trio
from libp2p.peer.id import ID

from client.checks import check_fingerprint_shape, check_outputs, non_finite
from client.deployment import load_pipeline
from client.health import PeerHealth, quiet_libp2p
from client.receipts import (
    LedgerReceipt,
    PendingReceipt,
    ReceiptError,
    ReceiptPending,
    append_entry,
    fetch_rankings,
    log_entry,
    receipt_entry,
    score_report_entry,
)
from client.replicated import MODES, Reply, plan, run_hop
from client.streams import StreamPool
from consensus.fingerprint import Tolerance, check_fingerprint, fingerprint
from consensus.reputation import Reputation
from crypto.identity import Identity, public_from_peer_id, verify
from models import Manifest, ManifestError, Pipeline, ShardSpec
from node.discovery import lookup_cards
from node.p2p import (
    ensure_connected,
    error_text,
    make_host,
    peer_info,
)
from node.peers import PeerRecord
from node.wire import (
    DEFAULT_FRAME_LIMIT,
    WIRE_VERSION,
    DigestEntry,
    WireError,
    decode_tensors,
    digest_entry,
    digest_of,
    encode_tensors,
    fingerprint_payload,
    receipt_payload,
)
from registry.card import CardInfo

log = logging.getLogger("veilnet.client")


class QueryError(RuntimeError):
    """A query that could not be answered; the message says which hop and why."""


@dataclass(frozen=True)
class HopRecord:
    """How one node-shard hop was served."""

    shard_index: int
    shard_cid: str
    node_did: str
    peer_id: str
    latency_ms: float
    request_id: str
    input_digest: str
    output_digest: str
    signature: str
    signature_verified: bool
    attempts: int  # nodes that answered this hop plus nodes that failed it
    failures: tuple[str, ...] = ()  # "<peer id>: <reason>", one line each, never empty
    verdict: dict[str, Any] | None = None  # replicated hops: who agreed, who lost (consensus)
    verified: bool = False  # the answer won a verdict among two or more nodes
    unverified_reason: str | None = None  # why not, when it did not

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["failures"] = list(self.failures)
        return doc


@dataclass(frozen=True)
class EmbedResult:
    embeddings: np.ndarray
    hops: list[HopRecord]
    receipt: LedgerReceipt | None = None  # the query's logged receipt (ledger=True)
    receipt_error: str | None = None      # why there is none, when logging was asked for
    # logged, but the witness cosignatures were late: the index and where to fetch the proof
    receipt_pending: PendingReceipt | None = None

    @property
    def verified(self) -> bool:
        """Every hop's answer won a verdict among two or more nodes."""
        return all(h.verified for h in self.hops)


class AsyncClient:
    """Use as ``async with AsyncClient(bootstrap, deployment) as client: await client.embed(...)``.

    ``bootstrap``: multiaddrs ending in /p2p/<PeerID>. ``deployment``: an encrypted deployment
    directory: manifest.json plus client/, whose client shards hold the key folded in and are
    the secret (mode 0600, refused otherwise); client/key.json is not read by queries. Timeouts
    are in seconds: ``timeout`` bounds a whole query, ``hop_timeout`` one node's answer,
    ``connect_timeout`` one dial.

    ``verify="full"`` never returns an answer fewer than two nodes agreed on: such a hop fails
    with QueryError, unless ``allow_unverified=True``, which returns it with
    ``HopRecord.verified`` false and ``unverified_reason`` (docs/consensus.md). Failed and slow
    nodes are skipped for a while (``health``, a ``PeerHealth``). py-libp2p's own error logs
    are silenced unless the application set a level on the 'libp2p' logger.
    """

    def __init__(self, bootstrap: Sequence[str], deployment: Path | str, *,
                 timeout: float = 120.0, hop_timeout: float = 30.0, connect_timeout: float = 5.0,
                 threads: int | None = None, frame_limit: int = DEFAULT_FRAME_LIMIT,
                 identity: Identity | None = None, ledger: bool = False,
                 witness_quorum: int = 1, receipt_timeout: float = 15.0,
                 verify: str = "full", replicas: int = 3, spot_rate: float = 0.1,
                 seed: int | None = None, allow_unverified: bool = False) -> None:
        if not bootstrap:
            raise ValueError("at least one bootstrap multiaddr is needed")
        for addr in bootstrap:
            peer_info(addr)  # raises ValueError naming the bad address
        self.bootstrap = list(bootstrap)
        self.deployment = Path(deployment)
        self.timeout, self.hop_timeout, self.connect_timeout = timeout, hop_timeout, connect_timeout
        self.frame_limit = frame_limit
        self.identity = identity or Identity.generate()
        self._threads = threads
        self._pipeline: Pipeline | None = None
        self._stack: AsyncExitStack | None = None
        self._host: Any = None
        self._peers: dict[str, PeerRecord] = {}
        self.health = PeerHealth()  # failures and backoff per peer, latency for hedging
        self._streams: StreamPool | None = None  # pooled infer streams, while open
        self.ledger, self.witness_quorum = ledger, witness_quorum
        self.receipt_timeout = receipt_timeout
        if verify not in MODES:
            raise ValueError(f"verify={verify!r}: use one of {', '.join(MODES)}")
        if replicas < 1 or not 0.0 <= spot_rate <= 1.0:
            raise ValueError("replicas must be >= 1 and spot_rate between 0 and 1")
        if verify == "full" and replicas < 2:
            raise ValueError("verify='full' needs replicas >= 2 (two agreeing answers); use "
                             "verify='none' for one node per hop")
        self.verify, self.replicas, self.spot_rate = verify, replicas, spot_rate
        self.allow_unverified = allow_unverified
        self.rng = random.Random(seed)
        self.reputation = Reputation()
        self.caught: set[str] = set()  # nodes that lost a decided verdict: avoided from now on
        self.rankings: dict[str, float] = {}  # did -> score in the network's ranking snapshot
        self._ckks: Any = None  # CkksSession (TenSEAL context with the secret key), on first use
        self.tolerance = Tolerance()
        self._ledgers: dict[str, CardInfo] = {}     # nodes whose cards name a ledger key
        self._witness_keys: dict[str, str] = {}     # peer id -> cosignature verifier key

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        quiet_libp2p()
        self._pipeline = await trio.to_thread.run_sync(load_pipeline, self.deployment,
                                                       self._threads, _never)
        tol = self._pipeline.manifest.extra.get("consensus")
        if isinstance(tol, dict):
            self.tolerance = Tolerance(float(tol.get("atol", self.tolerance.atol)),
                                       float(tol.get("rtol", self.tolerance.rtol)))
        stack = AsyncExitStack()
        try:
            self._host = make_host(self.identity)
            self._streams = StreamPool(self._host, self.frame_limit)
            await stack.enter_async_context(
                self._host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            self._stack = stack
            await self.refresh()
        except BaseException:
            await stack.aclose()
            self._stack = None
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stack is not None:
            with trio.move_on_after(3) as scope, contextlib.suppress(Exception):
                scope.shield = True
                await self._host.close()
            # host.run()'s nursery was opened in __aenter__, so it must close outside any
            # cancel scope opened here.
            stack, self._stack = self._stack, None
            self._pipeline, self._host, self._streams = None, None, None
            await stack.aclose()

    def _check_open(self) -> Pipeline:
        if self._stack is None or self._pipeline is None:
            raise RuntimeError("the client is not open: use it inside 'async with'")
        return self._pipeline

    @property
    def manifest(self) -> Manifest:
        return self._check_open().manifest

    # -- directory ------------------------------------------------------------------------------

    async def refresh(self) -> list[PeerRecord]:
        """Ask the bootstrap nodes for the agent cards of the deployment's nodes (card
        discovery). Every card is verified here: the bootstrap node is only an entry point.
        Raises QueryError if no bootstrap node answers."""
        if self._host is None:
            raise RuntimeError("the client is not open: use it inside 'async with'")
        pipeline = self._check_open()
        errors = []
        for addr in self.bootstrap:
            try:
                cards, rejected = await lookup_cards(
                    self._host, addr, deployment=pipeline.manifest.cid,
                    timeout=self.connect_timeout + 5, dial_timeout=self.connect_timeout)
            except (Exception, trio.TooSlowError) as exc:
                errors.append(f"{addr}: {error_text(exc)}")
                continue
            for reason in rejected:
                log.warning("%s returned a card that does not verify: %s", addr, reason)
            for card in cards:
                self._peers[card.peer_id] = PeerRecord(card.peer_id, card.did, card.multiaddrs,
                                                       card.shard_cids, card.http)
            if self.ledger:
                await self._refresh_ledgers(addr)
        if len(errors) == len(self.bootstrap):
            raise QueryError("no bootstrap node answered: " + "; ".join(errors))
        return list(self._peers.values())

    async def _refresh_ledgers(self, addr: str) -> None:
        """Ledger nodes and witness keys, from every card the bootstrap node knows."""
        try:
            cards, _ = await lookup_cards(self._host, addr, timeout=self.connect_timeout + 5,
                                          dial_timeout=self.connect_timeout)
        except (Exception, trio.TooSlowError) as exc:
            log.warning("%s: no ledger lookup: %s", addr, error_text(exc))
            return
        for card in cards:
            if card.ledger_key:
                self._ledgers[card.peer_id] = card
            if card.witness_key:
                self._witness_keys[card.peer_id] = card.witness_key
        for ledger in self._ledgers.values():
            try:
                self.rankings = await fetch_rankings(self._host, ledger, self.connect_timeout + 5)
                break
            except (Exception, trio.TooSlowError) as exc:
                log.info("no rankings from %s: %s", ledger.peer_id, exc)

    async def log_receipt(self, hops: Sequence[HopRecord]) -> LedgerReceipt:
        """Sign an infer-receipt/1 entry for a query's hops, log it at a ledger node and return
        it with a tlog-proof cosigned by ``witness_quorum`` witnesses; raises ReceiptError,
        or ReceiptPending when the entry was logged but the cosignatures were late."""
        if not self._ledgers:
            for addr in self.bootstrap:
                await self._refresh_ledgers(addr)
        if not self._ledgers:
            raise ReceiptError("no ledger node is known (none of the cards names a ledger key)")
        entry = receipt_entry(self.identity, self.manifest.cid, hops)
        errors = []
        for ledger in self._ledgers.values():
            witnesses = [k for p, k in sorted(self._witness_keys.items())
                         if p != ledger.peer_id]
            try:
                return await log_entry(self._host, ledger, entry, witnesses,
                                       self.witness_quorum, self.receipt_timeout)
            except ReceiptPending:
                raise  # logged: logging it again elsewhere would make two entries
            except (Exception, trio.TooSlowError) as exc:
                errors.append(f"{ledger.peer_id}: {error_text(exc)}")
        raise ReceiptError("; ".join(errors))

    def providers(self, shard_cid: str) -> list[PeerRecord]:
        """Nodes known to serve ``shard_cid``, in random order (``plan`` ranks them)."""
        serving = [r for r in self._peers.values() if shard_cid in r.shards]
        random.shuffle(serving)
        return serving

    # -- queries --------------------------------------------------------------------------------

    async def embed(self, texts: Sequence[str]) -> EmbedResult:
        """Sentence embeddings of ``texts``, computed through the network."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        if not texts:
            raise ValueError("embed() needs at least one text")
        tokenizer = self._check_open().tokenizer
        if tokenizer is None:
            raise ManifestError(f"{self.deployment}: the deployment names no tokenizer")
        outputs, hops = await self.run(tokenizer(list(texts)))
        embeddings = outputs[self.manifest.outputs[0].name]
        if not self.ledger:
            return EmbedResult(embeddings, hops)
        try:
            receipt = await self.log_receipt(hops)
        except ReceiptPending as exc:  # logged; only the witnesses were late
            log.warning("receipt %s", exc)
            await self.publish_scores()
            return EmbedResult(embeddings, hops, receipt_error=str(exc),
                               receipt_pending=exc.pending)
        except ReceiptError as exc:  # the answer stands; say why it is not logged
            log.warning("receipt not logged: %s", exc)
            return EmbedResult(embeddings, hops, receipt_error=str(exc))
        await self.publish_scores()
        return EmbedResult(embeddings, hops, receipt=receipt)

    async def publish_scores(self) -> int | None:
        """Append this client's signed score report (its reputation view of the nodes it used)
        to a ledger node; returns the entry's index, or None when it could not."""
        report = {self._peers[p].did: row for p, row in self.reputation.report().items()
                  if p in self._peers}
        if not report or not self._ledgers:
            return None
        entry = score_report_entry(self.identity, report)
        for ledger in self._ledgers.values():
            try:
                return await append_entry(self._host, ledger, entry, self.receipt_timeout)
            except (Exception, trio.TooSlowError) as exc:
                log.warning("score report not logged at %s: %s", ledger.peer_id, exc)
        return None

    async def run(self, inputs: Mapping[str, np.ndarray],
                  ) -> tuple[dict[str, np.ndarray], list[HopRecord]]:
        """Model inputs by name -> (model outputs by name, one HopRecord per node shard)."""
        pipeline = self._check_open()
        env: dict[str, np.ndarray] = dict(inputs)
        hops: list[HopRecord] = []
        # digest entries of tensors a node returned, reused when they feed the next hop
        known: dict[str, tuple[np.ndarray, DigestEntry]] = {}
        try:
            with trio.fail_after(self.timeout):
                for shard in pipeline.manifest.shards:
                    feeds = {t.name: env[t.name] for t in shard.inputs}
                    if shard.role == "node":
                        entries = {n: known[n][1] if n in known and known[n][0] is v
                                   else digest_entry(n, v) for n, v in feeds.items()}
                        outputs, hop, out_entries = await self._hop(shard, feeds, entries)
                        known.update({n: (outputs[n], e) for n, e in out_entries.items()})
                        hops.append(hop)
                    else:
                        outputs = await trio.to_thread.run_sync(pipeline.run_local, shard, feeds)
                    env.update(outputs)
        except trio.TooSlowError:
            raise QueryError(f"the query took longer than {self.timeout:g} s") from None
        final = {t.name: env[t.name] for t in pipeline.manifest.outputs}
        bad = non_finite(final)
        if bad:
            raise QueryError(f"the model's outputs are not finite ({bad}); nothing is returned "
                             f"(nodes: {', '.join(h.peer_id for h in hops)})")
        return final, hops

    def plan(self, shard_cid: str) -> list[PeerRecord]:
        """Nodes to ask for a hop, best first: by score with some randomness, nodes caught
        lying last. The score is this client's own reputation view once it has seen a verdict
        of the node, else the network's ranking (from a ledger node), else the neutral prior.
        Nodes in backoff after a failure (``health``) are left out, unless every node serving
        the shard is: then they come soonest-retry first."""
        providers = self.providers(shard_cid)
        ready = [r for r in providers if not self.health.backoff_left(r.peer_id)]
        if not ready:
            return sorted(providers, key=lambda r: self.health.backoff_left(r.peer_id))
        return plan(ready, self.node_score, self.caught, self.rng)

    def node_score(self, peer_id: str) -> float:
        if self.reputation.stats(peer_id).observations == 0:
            record = self._peers.get(peer_id)
            ranked = self.rankings.get(record.did) if record else None
            if ranked is not None:
                return ranked
        return self.reputation.score(peer_id)

    def mark_failed(self, peer_id: str, reason: str) -> None:
        """Remember that ``peer_id`` failed (it is skipped for a while, see ``health``)."""
        backoff = self.health.failed(peer_id, reason)
        log.info("%s failed (%s); skipped for %.0f s", peer_id, reason, backoff)

    async def run_ckks(self, inputs: Mapping[str, np.ndarray],
                       ) -> tuple[dict[str, np.ndarray], list[HopRecord]]:
        """Like ``run`` with the node shard evaluated on CKKS ciphertexts (docs/threat-model.md:
        the node cannot decrypt them). For square-activation MLP deployments (digits)."""
        from client.ckks_client import run_ckks

        try:
            with trio.fail_after(self.timeout):
                return await run_ckks(self, dict(inputs))
        except trio.TooSlowError:
            raise QueryError(f"the query took longer than {self.timeout:g} s") from None

    async def _hop(self, shard: ShardSpec, feeds: dict[str, np.ndarray],
                   entries: dict[str, DigestEntry],
                   ) -> tuple[dict[str, np.ndarray], HopRecord, dict[str, DigestEntry]]:
        if not self.providers(shard.cid):
            await self.refresh()
        return await run_hop(self, shard, feeds, digest_of(entries))

    async def _call(self, record: PeerRecord, shard: ShardSpec, feeds: dict[str, np.ndarray],
                    input_digest: bytes, want: str = "outputs") -> Reply:
        """One node's answer for one hop, checked: request id and shard echoed, output names,
        dtypes and ranks, digests, the receipt signature and, for ``want="fingerprint"``, the
        fingerprint and its signature. Raises WireError/RemoteError on anything wrong."""
        peer = await ensure_connected(self._host, record.peer_id, record.addrs,
                                      self.connect_timeout)
        request_id = secrets.token_hex(16)
        started = time.perf_counter()
        message: dict[str, Any] = {"v": WIRE_VERSION, "id": request_id, "shard": shard.cid,
                                   "inputs": encode_tensors(feeds)}
        if want != "outputs":
            message["want"] = want
        response = await self._infer(peer, message)
        latency_ms = (time.perf_counter() - started) * 1e3
        if response.get("id") != request_id or response.get("shard") != shard.cid:
            raise WireError("bad_response", "the response is for another request or shard")
        if response.get("input_digest") != input_digest:
            raise WireError("bad_response", "the node signed a different input digest")
        public = public_from_peer_id(record.peer_id)
        outputs = out_entries = None
        fp_signature = None
        if want == "outputs":
            outputs = decode_tensors(response.get("outputs"), "'outputs'")
            check_outputs(shard, outputs)
            out_entries = {n: digest_entry(n, v) for n, v in outputs.items()}
            output_digest = digest_of(out_entries)
            if response.get("output_digest") != output_digest:
                raise WireError("bad_response", "the output digest does not match the outputs")
            fp = fingerprint(outputs)
        else:
            output_digest = response.get("output_digest")
            fp_signature = response.get("fingerprint_signature")
            try:
                fp = check_fingerprint(response.get("fingerprint"))
            except ValueError as exc:
                raise WireError("bad_response", f"bad fingerprint: {exc}") from None
            check_fingerprint_shape(shard, fp)
            if not isinstance(output_digest, bytes) or len(output_digest) != 32:
                raise WireError("bad_response", "'output_digest' must be 32 bytes")
            if not isinstance(fp_signature, bytes) or not verify(
                    public, fp_signature,
                    fingerprint_payload(request_id, shard.cid, output_digest, fp)):
                raise WireError("bad_signature", "the fingerprint signature does not verify")
        signature = response.get("signature")
        payload = receipt_payload(request_id, shard.cid, input_digest, output_digest)
        if not isinstance(signature, bytes) or not verify(public, signature, payload):
            raise WireError("bad_signature", "the node's signature does not verify")
        hop = HopRecord(
            shard_index=shard.index, shard_cid=shard.cid, node_did=record.did,
            peer_id=record.peer_id, latency_ms=round(latency_ms, 3), request_id=request_id,
            input_digest=input_digest.hex(), output_digest=output_digest.hex(),
            signature=signature.hex(), signature_verified=True, attempts=1)
        return Reply(record, hop, outputs, out_entries, fp, fp_signature)

    async def _infer(self, peer: ID, message: dict[str, Any]) -> dict[str, Any]:
        """One infer exchange with ``peer`` on a pooled stream (client/streams.py)."""
        if self._streams is None:
            raise RuntimeError("the client is not open: use it inside 'async with'")
        return await self._streams.infer(peer, message)


def _never(shard: ShardSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    raise AssertionError("node shards run on nodes")  # Pipeline needs a runner; never called
