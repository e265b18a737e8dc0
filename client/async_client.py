"""``AsyncClient``: encrypted queries through veilnet nodes (trio).

The client is a light libp2p peer. It runs the deployment's client head and tail in-process (they
carry the secret key folded in), and sends each node shard's transformed activations to a node
that serves that shard over /veilnet/infer/1. Every response must carry a valid signature by the
PeerID the client reached over Noise, over (request id, shard CID, input digest, output digest);
anything else counts as a failed hop, and the hop is retried on another node serving the shard.
Every network step has a timeout, so a call ends in a result or a QueryError, never a hang.
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

from client.receipts import (
    LedgerReceipt,
    ReceiptError,
    append_entry,
    fetch_rankings,
    log_entry,
    receipt_entry,
    score_report_entry,
)
from client.replicated import MODES, Reply, plan, run_hop
from consensus.fingerprint import Tolerance, check_fingerprint, fingerprint
from consensus.reputation import Reputation
from crypto.identity import Identity, public_from_peer_id, verify
from models import Manifest, ManifestError, Pipeline, ShardSpec
from node.discovery import lookup_cards
from node.p2p import (
    INFER,
    STREAM_ERRORS,
    RemoteError,
    close_quietly,
    ensure_connected,
    exchange,
    make_host,
    open_stream,
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
# Idle infer streams are reused for this long; nodes close them after 30 s (idle_timeout).
STREAM_REUSE_S = 20.0
MAX_IDLE_STREAMS = 4


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
    attempts: int  # nodes tried for this hop, including the one that answered
    failures: tuple[str, ...] = ()
    verdict: dict[str, Any] | None = None  # replicated hops: who agreed, who lost (consensus)

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


class AsyncClient:
    """Use as ``async with AsyncClient(bootstrap, deployment) as client: await client.embed(...)``.

    ``bootstrap``: multiaddrs ending in /p2p/<PeerID>. ``deployment``: an encrypted deployment
    directory (manifest.json plus client/ with the key). Timeouts are in seconds: ``timeout``
    bounds a whole query, ``hop_timeout`` one node's answer, ``connect_timeout`` one dial.
    """

    def __init__(self, bootstrap: Sequence[str], deployment: Path | str, *,
                 timeout: float = 120.0, hop_timeout: float = 30.0, connect_timeout: float = 5.0,
                 threads: int | None = None, frame_limit: int = DEFAULT_FRAME_LIMIT,
                 identity: Identity | None = None, ledger: bool = False,
                 witness_quorum: int = 1, receipt_timeout: float = 15.0,
                 verify: str = "full", replicas: int = 3, spot_rate: float = 0.1,
                 seed: int | None = None) -> None:
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
        self._penalty: dict[str, float] = {}  # peer id -> time of its last failure
        self._idle: dict[str, list[tuple[Any, float]]] = {}  # peer id -> idle infer streams
        self.ledger, self.witness_quorum = ledger, witness_quorum
        self.receipt_timeout = receipt_timeout
        if verify not in MODES:
            raise ValueError(f"verify={verify!r}: use one of {', '.join(MODES)}")
        if replicas < 1 or not 0.0 <= spot_rate <= 1.0:
            raise ValueError("replicas must be >= 1 and spot_rate between 0 and 1")
        self.verify, self.replicas, self.spot_rate = verify, replicas, spot_rate
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
        self._pipeline = await trio.to_thread.run_sync(self._load_pipeline)
        tol = self._pipeline.manifest.extra.get("consensus")
        if isinstance(tol, dict):
            self.tolerance = Tolerance(float(tol.get("atol", self.tolerance.atol)),
                                       float(tol.get("rtol", self.tolerance.rtol)))
        stack = AsyncExitStack()
        try:
            self._host = make_host(self.identity)
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
            self._pipeline, self._host = None, None
            await stack.aclose()

    def _check_open(self) -> Pipeline:
        if self._stack is None or self._pipeline is None:
            raise RuntimeError("the client is not open: use it inside 'async with'")
        return self._pipeline

    def _load_pipeline(self) -> Pipeline:
        manifest = Manifest.load(self.deployment)
        if manifest.encryption == "none":
            log.warning("%s is not EE-encrypted: nodes see plaintext activations unless the "
                        "query runs in CKKS mode (run_ckks)", self.deployment)
        if not manifest.node_shards:
            raise ManifestError(f"{self.deployment}: the deployment has no node shards")
        # spin=False: busy-waiting onnxruntime threads here would steal the cores of nodes
        # running on the same machine (the testnet) while the client waits for them.
        return Pipeline(manifest, node_runner=_never, threads=self._threads, spin=False)

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
                errors.append(f"{addr}: {exc or type(exc).__name__}")
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
            log.warning("%s: no ledger lookup: %s", addr, exc or type(exc).__name__)
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
        it with a tlog-proof cosigned by ``witness_quorum`` witnesses; raises ReceiptError."""
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
            except (Exception, trio.TooSlowError) as exc:
                errors.append(f"{ledger.peer_id}: {exc or type(exc).__name__}")
        raise ReceiptError("; ".join(errors))

    def providers(self, shard_cid: str) -> list[PeerRecord]:
        """Nodes known to serve ``shard_cid``: never-failed first (shuffled), then by last
        failure."""
        serving = [r for r in self._peers.values() if shard_cid in r.shards]
        random.shuffle(serving)
        return sorted(serving, key=lambda r: self._penalty.get(r.peer_id, 0.0))

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
        return {t.name: env[t.name] for t in pipeline.manifest.outputs}, hops

    def plan(self, shard_cid: str) -> list[PeerRecord]:
        """Nodes to ask for a hop, best first: by score with some randomness, nodes caught
        lying last. The score is this client's own reputation view once it has seen a verdict
        of the node, else the network's ranking (from a ledger node), else the neutral prior."""
        return plan(self.providers(shard_cid), self.node_score, self.caught, self.rng)

    def node_score(self, peer_id: str) -> float:
        if self.reputation.stats(peer_id).observations == 0:
            record = self._peers.get(peer_id)
            ranked = self.rankings.get(record.did) if record else None
            if ranked is not None:
                return ranked
        return self.reputation.score(peer_id)

    def mark_failed(self, peer_id: str) -> None:
        self._penalty[peer_id] = time.monotonic()

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
            _check_outputs(shard, outputs)
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
            _check_fingerprint_shape(shard, fp)
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
        """One infer exchange, on an idle stream to ``peer`` when there is one (saving the
        stream negotiation) and on a new stream otherwise. A reused stream that the node has
        closed meanwhile is replaced once; a stream is pooled again only after a clean answer.
        """
        idle = self._idle.setdefault(str(peer), [])
        while idle:
            stream, since = idle.pop()
            if time.monotonic() - since < STREAM_REUSE_S:
                try:
                    response = await exchange(stream, message, self.frame_limit)
                except (WireError, *STREAM_ERRORS) as exc:
                    log.debug("reused stream to %s failed (%s); opening a new one", peer, exc)
                    await close_quietly(stream)
                    continue
                except BaseException:
                    await close_quietly(stream)
                    raise
                idle.append((stream, time.monotonic()))
                return response
            await close_quietly(stream)
        stream = await open_stream(self._host, peer, INFER)
        try:
            response = await exchange(stream, message, self.frame_limit)
        except BaseException:
            await close_quietly(stream)
            raise
        if len(idle) < MAX_IDLE_STREAMS:
            idle.append((stream, time.monotonic()))
        else:
            await close_quietly(stream)
        return response


def _check_outputs(shard: ShardSpec, outputs: dict[str, np.ndarray]) -> None:
    expected = {t.name: t for t in shard.outputs}
    if set(outputs) != set(expected):
        raise WireError("bad_response", f"outputs {sorted(outputs)}, expected {sorted(expected)}")
    for name, spec in expected.items():
        value = outputs[name]
        if value.dtype.name != spec.dtype or value.ndim != len(spec.shape):
            raise WireError("bad_response", f"output {name!r} is {value.dtype.name} rank "
                                            f"{value.ndim}, expected {spec.dtype} rank "
                                            f"{len(spec.shape)}")


def _check_fingerprint_shape(shard: ShardSpec, fp: dict[str, Any]) -> None:
    expected = {t.name: t for t in shard.outputs}
    tensors = fp.get("tensors", {})
    if set(tensors) != set(expected):
        raise WireError("bad_response", f"fingerprint of {sorted(tensors)}, expected "
                                        f"{sorted(expected)}")
    for name, spec in expected.items():
        t = tensors[name]
        if t.get("dtype") != spec.dtype or len(t.get("shape", ())) != len(spec.shape):
            raise WireError("bad_response", f"fingerprint of {name!r} has the wrong dtype or "
                                            "rank")


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, RemoteError | WireError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _never(shard: ShardSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    raise AssertionError("node shards run on nodes")  # Pipeline needs a runner; never called
