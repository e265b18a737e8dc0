"""``AsyncClient``: encrypted queries through veilnet nodes (trio).

The client is a light libp2p peer. It runs the deployment's client head and tail in-process
(``models.Pipeline.run_async``) and sends each node shard's transformed activations to nodes
that serve that shard over /veilnet/infer/1. The EE key is folded into the client head and tail
(DEPLOY/client/*.onnx): those files ARE the secret, and the client refuses to load them when
others can read them or when they do not hash to their CIDs in the manifest
(client/deployment.py); a query never reads client/key.json.

The parts, each in its own module:

- ``Router`` (client/router.py): the nodes learnt from verified agent cards, who to ask for a
  hop, and what the client remembers about each node (failures, reputation, caught liars);
- ``InferCaller`` (client/caller.py): one node's checked answer (protocols/infer.py checks ids,
  digests, outputs and signatures);
- ``run_hop`` (client/replicated.py): one hop under the ``VerifyPolicy`` (full, spot, none);
  ``run_ckks`` (client/ckks_client.py) in CKKS mode;
- ``Ledgers`` (client/ledgers.py): ledger nodes and witnesses; after each query the client logs
  a signed receipt and its score report there when it knows a ledger node (``ledger=False``
  turns that off). A receipt that fails leaves the answer standing, with the reason.

Every network step has a timeout, so a call ends in a result or a QueryError, never a hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import multiaddr
import numpy as np
import trio
from libp2p.abc import IHost
from tokenizers import Tokenizer

from client.caller import InferCaller
from client.deployment import load_pipeline
from client.generation import Generation, Prompt, Settings, TokenDelta, load_tokenizer
from client.health import quiet_libp2p
from client.ledgers import Ledgers
from client.masked_hop import MaskedRunner, QueryMasks
from client.receipts import LedgerReceipt, ReceiptError, ReceiptPending
from client.replicated import VerifyPolicy, run_hop
from client.results import EmbedResult, GenerateResult, HopRecord, QueryError
from client.router import Router
from client.session_hop import SessionCaller, SessionHop
from consensus.fingerprint import Tolerance
from crypto.identity import Identity
from errors import InputError
from models import Manifest, ManifestError, Pipeline, ShardSpec
from models.decoding import DecoderLayout
from models.manifest import MASKED
from models.masked import pad_to_bucket
from models.pipeline import Tensors
from protocols.cards import lookup_cards
from protocols.infer import non_finite
from protocols.peers import PeerRecord
from protocols.transport import DIAL_TIMEOUT, PEER_ERRORS, error_text, make_host, peer_info
from protocols.wire import DEFAULT_FRAME_LIMIT, DigestEntry, digest_entry, digest_of

log = logging.getLogger("veilnet.client")
LEDGER_LOOKUP_S = 30.0  # with no ledger node known, look for one again at most this often
# with fewer nodes known for a shard than a verified hop asks, look them up again at most this
# often (a card can be missing from the bootstrap's answer for a moment, e.g. while a
# restarted node's card is checked; with no node known the lookup is repeated every time)
SHORT_LOOKUP_S = 5.0


class AsyncClient:
    """Use as ``async with AsyncClient(bootstrap, deployment) as client: await client.embed(...)``.

    ``bootstrap``: multiaddrs ending in /p2p/<PeerID>. ``deployment``: an encrypted deployment
    directory: manifest.json plus client/, whose client shards hold the key folded in and are
    the secret (mode 0600, refused otherwise). Timeouts are in seconds: ``timeout`` bounds a
    whole query, ``hop_timeout`` one node's answer, ``connect_timeout`` one dial.

    ``verify`` (``"full"``, ``"spot"``, ``"none"``), ``replicas``, ``spot_rate`` and
    ``allow_unverified`` set the ``VerifyPolicy``: ``"full"`` never returns an answer fewer
    than two nodes agreed on unless ``allow_unverified`` (docs/consensus.md). ``ledger``: log a
    receipt and a score report after each query when a ledger node is known (default);
    ``witness_quorum`` cosignatures the receipt's checkpoint needs, within
    ``receipt_timeout``. ``seed`` makes node selection repeatable. py-libp2p's own error logs
    are silenced unless the application set a level on the 'libp2p' logger.
    """

    def __init__(self, bootstrap: Sequence[str], deployment: Path | str, *,
                 timeout: float = 120.0, hop_timeout: float = 30.0,
                 connect_timeout: float = DIAL_TIMEOUT,
                 threads: int | None = None, frame_limit: int = DEFAULT_FRAME_LIMIT,
                 identity: Identity | None = None, ledger: bool = True,
                 witness_quorum: int = 1, receipt_timeout: float = 15.0,
                 verify: str = "full", replicas: int = 3, spot_rate: float = 0.1,
                 seed: int | None = None, allow_unverified: bool = False) -> None:
        if not bootstrap:
            raise InputError("at least one bootstrap multiaddr is needed")
        for addr in bootstrap:
            peer_info(addr)  # raises InputError naming the bad address
        self.bootstrap = list(bootstrap)
        self.deployment = Path(deployment)
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.frame_limit, self.threads = frame_limit, threads
        self.identity = identity or Identity.generate()
        self.ledger = ledger
        self.policy = VerifyPolicy(verify, replicas, spot_rate, allow_unverified, hop_timeout)
        self.router = Router(random.Random(seed))
        self.ledgers = Ledgers(self.identity, witness_quorum=witness_quorum,
                               receipt_timeout=receipt_timeout, timeout=connect_timeout + 5)
        self._ledger_lookup_at = -LEDGER_LOOKUP_S  # trio clock time of the last lookup
        self._refreshed_at = -SHORT_LOOKUP_S  # trio clock time of the last card lookup
        self._pipeline: Pipeline | None = None
        self._stack: AsyncExitStack | None = None
        self._host: IHost | None = None
        self._caller: InferCaller | None = None
        self._ckks: Any = None  # CkksSession (TenSEAL context with the secret key), on first use
        self._tokenizer: Tokenizer | None = None  # a decoder's, on first generation
        self._masked: MaskedRunner | None = None  # masked/1 deployments, on first query

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        quiet_libp2p()
        self._pipeline = await trio.to_thread.run_sync(load_pipeline, self.deployment,
                                                       self.threads)
        tol = self._pipeline.manifest.extra.get("consensus")
        if isinstance(tol, dict):
            default = self.policy.tolerance
            self.policy.tolerance = Tolerance(float(tol.get("atol", default.atol)),
                                              float(tol.get("rtol", default.rtol)))
        stack = AsyncExitStack()
        try:
            host = self._host = make_host(self.identity)
            self._caller = InferCaller(host, self.frame_limit, self.connect_timeout)
            await stack.enter_async_context(
                host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            self._stack = stack
            await self.refresh()
        except BaseException:
            await stack.aclose()
            self._stack = None
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stack is not None:
            host = self._host
            assert host is not None
            with trio.move_on_after(3) as scope, contextlib.suppress(Exception):
                scope.shield = True  # closing is best effort: the host may already be broken
                await host.close()
            # host.run()'s nursery was opened in __aenter__, so it must close outside any
            # cancel scope opened here.
            stack, self._stack = self._stack, None
            self._pipeline, self._host, self._caller = None, None, None
            self._masked = None
            await stack.aclose()

    def _open(self) -> tuple[Pipeline, IHost, InferCaller]:
        if self._stack is None or self._pipeline is None or self._host is None \
                or self._caller is None:
            raise RuntimeError("the client is not open: use it inside 'async with'")
        return self._pipeline, self._host, self._caller

    @property
    def manifest(self) -> Manifest:
        return self._open()[0].manifest

    # -- directory ------------------------------------------------------------------------------

    async def refresh(self) -> list[PeerRecord]:
        """Ask the bootstrap nodes for the agent cards of the deployment's nodes (card
        discovery), and for ledger nodes when receipts are on. Every card is verified here:
        the bootstrap node is only an entry point. Raises QueryError if no bootstrap node
        answers."""
        pipeline, host, _ = self._open()
        self._refreshed_at = trio.current_time()
        errors = []
        for addr in self.bootstrap:
            try:
                cards, rejected = await lookup_cards(
                    host, addr, deployment=pipeline.manifest.cid,
                    timeout=self.connect_timeout + 5, dial_timeout=self.connect_timeout)
            except PEER_ERRORS as exc:
                errors.append(f"{addr}: {error_text(exc)}")
                continue
            for reason in rejected:
                log.warning("%s returned a card that does not verify: %s", addr, reason)
            self.router.learn(cards)
            if self.ledger:
                await self._lookup_ledgers(addr)
        if len(errors) == len(self.bootstrap):
            raise QueryError("no bootstrap node answered: " + "; ".join(errors))
        return list(self.router.peers.values())

    async def _known_providers(self, shards: Sequence[ShardSpec]) -> None:
        """Look the deployment's nodes up again when a shard has no known node, or fewer than
        a verified hop asks for and the last lookup is ``SHORT_LOOKUP_S`` old."""
        counts = [len(self.router.providers(s.cid)) for s in shards]
        want = self.policy.replicas if self.policy.mode == "full" else 1
        if not all(counts) or (min(counts, default=want) < want and trio.current_time()
                               - self._refreshed_at >= SHORT_LOOKUP_S):
            await self.refresh()

    async def _lookup_ledgers(self, addr: str) -> None:
        """Ledger nodes and witness keys from every card ``addr`` knows; the network's
        rankings from a ledger node."""
        _, host, _ = self._open()
        self._ledger_lookup_at = trio.current_time()
        try:
            cards, _ = await lookup_cards(host, addr, timeout=self.connect_timeout + 5,
                                          dial_timeout=self.connect_timeout)
        except PEER_ERRORS as exc:
            log.warning("%s: no ledger lookup: %s", addr, error_text(exc))
            return
        self.ledgers.learn(cards)
        rankings = await self.ledgers.fetch_rankings(host)
        if rankings:
            self.router.rankings = rankings

    async def _find_ledgers(self) -> None:
        if not self.ledgers.known \
                and trio.current_time() - self._ledger_lookup_at >= LEDGER_LOOKUP_S:
            for addr in self.bootstrap:
                await self._lookup_ledgers(addr)

    # -- queries --------------------------------------------------------------------------------

    async def embed(self, texts: Sequence[str]) -> EmbedResult:
        """Sentence embeddings of ``texts``, computed through the network, with the query's
        receipt when a ledger node logged it (or why not)."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        if not texts:
            raise InputError("embed() needs at least one text")
        pipeline, _, _ = self._open()
        if pipeline.tokenizer is None:
            raise ManifestError(f"{self.deployment}: the deployment names no tokenizer")
        outputs, hops = await self.run(pipeline.tokenizer(list(texts)))
        embeddings = outputs[pipeline.manifest.outputs[0].name]
        return EmbedResult(embeddings, hops, **await self._log(lambda: self.log_receipt(hops)))

    async def _log(self, log_it: Callable[[], Awaitable[LedgerReceipt]]) -> dict[str, Any]:
        """The receipt fields of a result: the query's receipt and score report, logged when
        receipts are on and a ledger node is known. (Sequential on purpose: appended at once,
        the score report's commit starts a witness round that the receipt's checkpoint then
        waits behind; measured 67-72 ms added at p50 instead of 37 ms.)"""
        if not self.ledger:
            return {}
        try:
            receipt = await log_it()
        except ReceiptPending as exc:  # logged; only the witnesses were late
            log.warning("receipt %s", exc)
            await self.publish_scores()
            return {"receipt_error": str(exc), "receipt_pending": exc.pending}
        except ReceiptError as exc:  # the answer stands; say why it is not logged
            level = logging.WARNING if self.ledgers.known else logging.INFO
            log.log(level, "receipt not logged: %s", exc)
            return {"receipt_error": str(exc)}
        await self.publish_scores()
        return {"receipt": receipt}

    async def log_receipt(self, hops: Sequence[HopRecord]) -> LedgerReceipt:
        """Log a signed infer-receipt/1 entry of a query's hops at a ledger node and return it
        with a tlog-proof cosigned by the witness quorum; raises ReceiptError, or
        ReceiptPending when the entry was logged but the cosignatures were late."""
        pipeline, host, _ = self._open()
        await self._find_ledgers()
        return await self.ledgers.log_receipt(host, pipeline.manifest.cid, hops)

    async def log_generation(self, result: GenerateResult) -> LedgerReceipt:
        """Log a signed generate-receipt/1 entry of a generation (docs/ledger.md); raises like
        ``log_receipt``."""
        pipeline, host, _ = self._open()
        await self._find_ledgers()
        return await self.ledgers.log_generation(host, pipeline.manifest.cid, result.hops,
                                                 len(result.prompt_token_ids),
                                                 len(result.token_ids))

    async def publish_scores(self) -> int | None:
        """Append this client's signed score report (its reputation view of the nodes it used)
        to a ledger node; returns the entry's index, or None when it could not."""
        _, host, _ = self._open()
        return await self.ledgers.publish_scores(host, self.router.report())

    async def run(self, inputs: Mapping[str, np.ndarray]) -> tuple[Tensors, list[HopRecord]]:
        """Model inputs by name -> (model outputs by name, one HopRecord per node shard)."""
        pipeline, _, caller = self._open()
        hops: list[HopRecord] = []
        # digest entries of tensors a node returned, reused when they feed the next hop
        known: dict[str, tuple[np.ndarray, DigestEntry]] = {}
        masked = pipeline.manifest.encryption == MASKED
        if masked:  # the length is hidden to a bucket: padding only the client knows of
            inputs = pad_to_bucket(pipeline.manifest, dict(inputs))
            if self._masked is None:
                self._masked = MaskedRunner(pipeline.manifest, caller, self.router, self.policy)
        masked_runner = self._masked if masked else None

        masks: QueryMasks | None = None

        async def masked_hop(shard: ShardSpec, feeds: Tensors) -> Tensors:
            assert masked_runner is not None  # providers: looked up before the query
            outputs, records = await masked_runner.run(shard, feeds, masks)
            hops.extend(records)
            return outputs

        async def node_hop(shard: ShardSpec, feeds: Tensors) -> Tensors:
            entries = {n: known[n][1] if n in known and known[n][0] is v
                       else digest_entry(n, v) for n, v in feeds.items()}
            await self._known_providers([shard])
            outputs, hop, out_entries = await run_hop(caller, self.router, self.policy, shard,
                                                      feeds, digest_of(entries))
            known.update({n: (outputs[n], e) for n, e in out_entries.items()})
            hops.append(hop)
            return outputs

        try:
            with trio.fail_after(self.timeout):
                if masked_runner is not None:
                    rows = int(np.prod(next(iter(inputs.values())).shape))
                    await self._known_providers(pipeline.manifest.node_shards)
                    async with masked_runner.query(rows) as masks:
                        final = await pipeline.run_async(inputs, masked_hop, self._run_local)
                else:
                    final = await pipeline.run_async(inputs, node_hop, self._run_local)
        except trio.TooSlowError:
            raise QueryError(f"the query took longer than {self.timeout:g} s") from None
        bad = non_finite(final)
        if bad:
            raise QueryError(f"the model's outputs are not finite ({bad}); nothing is returned "
                             f"(nodes: {', '.join(h.peer_id for h in hops)})")
        return final, hops

    async def run_ckks(self, inputs: Mapping[str, np.ndarray],
                       ) -> tuple[Tensors, list[HopRecord]]:
        """Like ``run`` with the node shard evaluated on CKKS ciphertexts (docs/threat-model.md:
        the node cannot decrypt them). For square-activation MLP deployments (digits)."""
        from client.ckks_client import CkksSession, run_ckks  # loads TenSEAL: only when used

        pipeline, _, caller = self._open()
        if self._ckks is None:
            self._ckks = await trio.to_thread.run_sync(CkksSession)
        if not all(self.router.providers(s.cid) for s in pipeline.manifest.node_shards):
            await self.refresh()
        try:
            with trio.fail_after(self.timeout):
                return await run_ckks(caller, self.router, pipeline, self._ckks, dict(inputs),
                                      self.policy.hop_timeout)
        except trio.TooSlowError:
            raise QueryError(f"the query took longer than {self.timeout:g} s") from None

    # -- generation -----------------------------------------------------------------------------

    def stream(self, prompt: str | None = None, *,
               messages: Sequence[Mapping[str, str]] | None = None, max_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: Sequence[str] | str = ()) -> GenerationStream:
        """A generation through the network, token by token (decoder deployments):
        ``async with client.stream("Hello") as s: async for t in s: print(t.text)``, then
        ``s.result``. Give a ``prompt`` or chat ``messages`` ({role, content}; the model's
        chat template is applied). Sampling happens here: ``temperature`` 0 is greedy,
        ``top_p`` nucleus sampling, ``seed`` repeatable draws; ``stop`` strings end the text
        where they begin. ``timeout`` bounds the prompt and each token."""
        settings = Settings(max_tokens, temperature, top_p, seed, stop)
        return GenerationStream(self, prompt, messages, settings)

    async def generate(self, prompt: str | None = None, *,
                       messages: Sequence[Mapping[str, str]] | None = None,
                       max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None, stop: Sequence[str] | str = (),
                       ) -> GenerateResult:
        """``stream`` run to the end: the text, token ids, hops with their verdicts, and the
        generation's receipt (or why there is none)."""
        async with self.stream(prompt, messages=messages, max_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, seed=seed,
                               stop=stop) as generation:
            async for _ in generation:
                pass
        assert generation.result is not None
        return generation.result

    async def _start_generation(self, prompt: str | None,
                               messages: Sequence[Mapping[str, str]] | None,
                               settings: Settings) -> Generation:
        """A ``Generation`` ready to step (``GenerationStream`` drives it)."""
        pipeline, host, caller = self._open()
        layout = DecoderLayout.of(pipeline.manifest)
        if self._tokenizer is None:
            self._tokenizer = await trio.to_thread.run_sync(load_tokenizer, pipeline.manifest)
        first = Prompt.of(self._tokenizer, pipeline.manifest, prompt, messages)
        await self._known_providers(layout.manifest.node_shards)
        sessions = SessionCaller(host, caller.streams, self.connect_timeout)
        hops = {s.index: SessionHop(sessions, self.router, self.policy, s, layout)
                for s in layout.manifest.node_shards}
        return Generation(layout, self._tokenizer, first, settings, hops, self._run_local,
                          self.timeout)

    async def _run_local(self, shard: ShardSpec, feeds: Tensors) -> Tensors:
        pipeline, _, _ = self._open()
        return await trio.to_thread.run_sync(pipeline.run_local, shard, feeds)


class GenerationStream:
    """One generation as an async iterator of ``TokenDelta``, inside ``async with`` (which
    closes the sessions on the nodes, also when the caller stops early); ``result`` once the
    iteration ends."""

    def __init__(self, client: AsyncClient, prompt: str | None,
                 messages: Sequence[Mapping[str, str]] | None, settings: Settings) -> None:
        self._client, self._prompt, self._messages = client, prompt, messages
        self.settings = settings
        self._generation: Generation | None = None
        self.result: GenerateResult | None = None

    async def __aenter__(self) -> GenerationStream:
        self._generation = await self._client._start_generation(self._prompt, self._messages,
                                                               self.settings)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._generation is not None:
            await self._generation.aclose()

    def holders(self) -> dict[int, list[str]]:
        """PeerIDs holding this generation's sessions now, per node shard index."""
        return self._generation.holders() if self._generation is not None else {}

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> TokenDelta:
        token = await self.next()
        if token is None:
            raise StopAsyncIteration
        return token

    async def next(self) -> TokenDelta | None:
        """The next token, or None at the end (then ``result`` is set)."""
        generation = self._generation
        if generation is None:
            raise RuntimeError("use the stream inside 'async with'")
        token = await generation.next()
        if token is None and self.result is None:
            result = generation.result()
            logged = await self._client._log(lambda: self._client.log_generation(result))
            self.result = dataclasses.replace(result, **logged)
        return token


__all__ = ["AsyncClient", "GenerationStream"]
