"""``veilnet audit`` for ``masked/1`` deployments (models/masked.py; docs/threat-model.md,
"masked/1").

A ``masked/1`` node shard is a public float64 MatMul; what a node receives is ``x + r``: the
rows ``x`` of the shard's input (one per token, ``batch x bucket`` rows, flattened) plus a fresh
Gaussian mask ``r ~ N(0, sigma^2 I)`` (crypto/masks.py, ``sigma`` from the manifest); the mask's
node receives only a seed and draws ``r``. There is no key. The audit simulates that traffic for
held-out text (models/audit.py ``heldout_sentences``, 64 tokens at most, texts grouped by bucket
and padded as the client pads them; the owner's client shards compute ``x``, the products are
the node shards' own weights) and runs, as a node holding the public plaintext weights would:

- **nearest embedding** on the layer-0 ``qkv`` input, whose rows are ``LN(word + position +
  type)``: per row, the vocabulary entry nearest to ``x + r`` at the row's position (positions
  given to the attacker). That is the maximum-likelihood reader for Gaussian noise; the MAP
  reader adds the log-frequency of each token in public text (the Bayes-optimal reader);
- **keyless norms**: each row's norm, debiased by the mask's expected ``d sigma^2``, against
  the candidates' norms at that position;
- **a linear probe** per node shard kind of the first and the last layer: ridge regression onto
  one-hot token ids, trained on public text's views (masked like the real ones, by the
  attacker's own simulation) with its penalty picked on held-out public views;
- **averaging** ``k`` repeated queries of the same text: the mean of ``k`` independent masks is
  exactly ``N(0, sigma^2 / k)``, drawn as one ``veilnet-mask/1`` mask of ``sigma / sqrt(k)``;
- **length**: the node sees ``batch x bucket`` rows, never the attention mask;
- **collusion**: node A's ``x + r`` minus node B's ``r`` is ``x``; then nearest embedding.

Only rows of real tokens are kept (padding and special tokens are not scored), each with its
own i.i.d. mask as in the real traffic, from seeds derived from the audit's seed (reproducible;
the client uses fresh OS seeds: the same distribution).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from crypto.masks import expand_mask
from models import audit_attacks as aa
from models.audit_attacks import RidgeProbe
from models.audit_report import (
    MAX_TOKENS,
    AuditError,
    AuditReport,
    client_file,
    heldout_sentences,
    most_common_rate,
    special_ids,
    timed,
)
from models.importer import Progress, no_progress
from models.manifest import Manifest, ShardSpec
from models.masked import MaskedPlan, bucket_length, node_weight, pad_to_bucket
from models.pipeline import Pipeline
from models.tokenizer import TextTokenizer

QUERIES = (1, 10, 100, 10_000, 1_000_000, 100_000_000)  # repeated queries averaged (e)
PRIOR_ALPHA = 0.01  # add-alpha smoothing of the public-text token prior
CHUNK = 256  # rows per block of [rows, vocabulary] scores
COLLUSION = "collusion: A's x + r minus B's r"
ONE = "one node, one query"  # the scope of the single-node, single-query rows
NOT_APPLICABLE = ("not applicable: masked/1 node shards hold the public weights unchanged, so "
                  "there is no secret in them to recover; privacy rests on the masks")


def shard_name(shard: ShardSpec) -> str:
    """``masked/{l}/{kind}/in``: the node shard's one input."""
    return shard.inputs[0].name


def layer_kind(shard: ShardSpec) -> tuple[int, str]:
    _, layer, kind, _ = shard_name(shard).split("/")
    return int(layer), kind


def first_qkv(deploy: Manifest) -> ShardSpec:
    return next(s for s in deploy.node_shards if layer_kind(s) == (0, "qkv"))


def mask_seed(seed: int, label: str) -> bytes:
    """A reproducible 32-byte mask seed for the audit's simulated traffic."""
    return hashlib.sha256(f"veilnet-audit-masked/{seed}/{label}".encode()).digest()


# --- traffic --------------------------------------------------------------------------------------

@dataclass
class Traffic:
    """What the client sends node shards for some texts, unmasked, real-token rows only."""

    ids: np.ndarray  # [n] token id of each kept row
    positions: np.ndarray  # [n] its position in its text
    x: dict[str, np.ndarray]  # node shard CID -> [n, d] float64 input rows
    lengths: np.ndarray  # tokens per text (with [CLS] and [SEP])
    requests: list[tuple[int, int]] = field(default_factory=list)  # (batch, bucket) sent


class _Enough(Exception):
    """Raised by the simulated node once the last node shard of interest has its input."""


class Simulator:
    """Runs texts through the deployment's client shards (grouped by bucket, one request per
    bucket, padded with ``pad_to_bucket``) with the node shards' products computed in process,
    and keeps the inputs of ``shards`` at the rows of real (non-special) tokens."""

    def __init__(self, deploy: Manifest, shards: Iterable[ShardSpec]) -> None:
        tok_path = client_file(deploy, "tokenizer")
        shards = list(shards)
        self.deploy, self.keep = deploy, {s.cid for s in shards}
        self.last = max(s.index for s in shards)  # nothing after it is needed
        self.tok, self.special = TextTokenizer(tok_path, MAX_TOKENS), list(special_ids(tok_path))
        self.weights = {s.cid: node_weight(deploy, s) for s in deploy.node_shards}
        self.pipe = Pipeline(deploy, node_runner=self._node, spin=False)
        self._got: dict[str, list[np.ndarray]] = defaultdict(list)
        self._real = np.zeros(0, bool)

    def _node(self, shard: ShardSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feeds[shard_name(shard)]
        if shard.cid in self.keep:
            self._got[shard.cid].append(x[self._real])
        if shard.index == self.last:
            raise _Enough
        return {shard.outputs[0].name: x @ self.weights[shard.cid]}

    def follow(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every kept shard's input, all rows (padding too), for one request's padded
        ``inputs`` (``input_ids``, ``attention_mask``, ... of ``[batch, bucket]``)."""
        self._got = defaultdict(list)
        self._real = np.ones(inputs["input_ids"].size, bool)
        with contextlib.suppress(_Enough):
            self.pipe.run(inputs)
        return {cid: v[0] for cid, v in self._got.items()}

    def __call__(self, texts: Sequence[str]) -> Traffic:
        lengths = self.tok(list(texts))["attention_mask"].sum(axis=1)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, n in enumerate(lengths):
            groups[bucket_length(self.deploy, int(n))].append(i)
        self._got = defaultdict(list)
        ids, positions, requests = [], [], []
        for bucket, idx in sorted(groups.items()):
            inputs = pad_to_bucket(self.deploy, self.tok([texts[i] for i in idx]))
            real = (inputs["attention_mask"] == 1) & ~np.isin(inputs["input_ids"], self.special)
            self._real = real.reshape(-1)
            with contextlib.suppress(_Enough):
                self.pipe.run(inputs)
            ids.append(inputs["input_ids"][real])
            positions.append(np.nonzero(real)[1])
            requests.append((len(idx), bucket))
        return Traffic(np.concatenate(ids), np.concatenate(positions),
                       {cid: np.concatenate(v) for cid, v in self._got.items()}, lengths,
                       requests)


def masked_view(x: np.ndarray, seed: bytes, sigma: float) -> np.ndarray:
    """``x + r`` with ``r`` the ``veilnet-mask/1`` mask of ``seed`` and ``|sigma|`` (a negative
    sigma subtracts it: what a colluding pair does; ``sigma == 0``: ``x``)."""
    if sigma == 0:
        return x.copy()
    r = expand_mask(seed, x.shape, abs(sigma))
    return x + r if sigma > 0 else x - r


# --- readers --------------------------------------------------------------------------------------

def token_prior(ids: np.ndarray, vocab: int) -> np.ndarray:
    """log p(token) from public text's token counts (add-PRIOR_ALPHA smoothing), ``[vocab]``."""
    counts = np.bincount(ids, minlength=vocab).astype(np.float64) + PRIOR_ALPHA
    return np.log(counts / counts.sum())


class Candidates:
    """``c[t, v] = LN(word[v] + position[t] + token_type[0])`` for every token ``v``, factored so
    that rows at mixed positions are scored in one matrix product: with ``u = bc[v] + pc[t]``
    (both centred), ``s = sqrt(|u|^2 / d + eps)``, ``c = gamma u / s + beta``, so
    ``o.c = ((o gamma).bc[v] + (o gamma).pc[t]) / s + o.beta``."""

    def __init__(self, emb: aa.EncoderEmbeddings, positions: np.ndarray) -> None:
        base = emb.word + emb.token_type[0]
        bc = base - base.mean(axis=1, keepdims=True)
        pos = emb.position[np.unique(positions)]
        self.index = {int(t): i for i, t in enumerate(np.unique(positions))}
        pc = pos - pos.mean(axis=1, keepdims=True)
        g, b, d = emb.gamma, emb.beta, base.shape[1]
        self.g, self.b, self.pc = g, b, pc
        self.bc_t = np.ascontiguousarray(bc.T.astype(np.float32))  # [d, V]
        # [T, V]: |u|^2 and the norms of the candidates, per position
        uu = (np.sum(bc * bc, axis=1)[None, :] + 2 * pc @ bc.T
              + np.sum(pc * pc, axis=1)[:, None])
        self.s = np.sqrt(uu / d + emb.eps)
        guu = (np.sum((g * bc) ** 2, axis=1)[None, :] + 2 * pc @ (g * g * bc).T
               + np.sum((g * pc) ** 2, axis=1)[:, None])
        gbu = (bc @ (g * b))[None, :] + (pc @ (g * b))[:, None]
        self.cc = guu / self.s ** 2 + 2 * gbu / self.s + float(b @ b)

    def rows_of(self, positions: np.ndarray) -> np.ndarray:
        return np.array([self.index[int(t)] for t in positions], np.int64)

    def dist(self, rows: np.ndarray, at: np.ndarray) -> np.ndarray:
        """``|c|^2 - 2 o.c`` ``[n, V]`` (the squared distance less ``|o|^2``) of ``rows``
        observed at position slots ``at`` (``rows_of``)."""
        og = rows * self.g
        dot = og.astype(np.float32) @ self.bc_t
        dot += (np.sum(og * self.pc[at], axis=1))[:, None].astype(np.float32)
        return self.cc[at] - 2 * (dot / self.s[at] + (rows @ self.b)[:, None])


def read_nearest(cands: Candidates, positions: np.ndarray,
                 observed: dict[str, tuple[np.ndarray, float]],
                 log_prior: np.ndarray | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each named ``(rows [n, d], sigma)``: the maximum-likelihood token of each row (the
    nearest candidate at its position) and the MAP token (adds ``log_prior``; equal to ML where
    sigma is 0 or no prior is given)."""
    at = cands.rows_of(positions)
    out = {}
    for name, (rows, sigma) in observed.items():
        ml, mp = np.empty(len(at), np.int64), np.empty(len(at), np.int64)
        for start in range(0, len(at), CHUNK):
            sel = slice(start, start + CHUNK)
            dist = cands.dist(rows[sel], at[sel])
            ml[sel] = np.argmin(dist, axis=1)
            if sigma > 0 and log_prior is not None:
                mp[sel] = np.argmin(dist / (2 * sigma * sigma) - log_prior[None, :], axis=1)
            else:
                mp[sel] = ml[sel]
        out[name] = (ml, mp)
    return out


def read_norms(cands: Candidates, positions: np.ndarray, rows: np.ndarray,
               sigma: float) -> np.ndarray:
    """Keyless: the candidate whose squared norm is nearest ``|x + r|^2 - d sigma^2``."""
    est = np.sum(rows * rows, axis=1) - rows.shape[1] * sigma * sigma
    at = cands.rows_of(positions)
    return np.array([np.argmin(np.abs(cands.cc[a] - e)) for a, e in zip(at, est, strict=True)],
                    np.int64)


# --- the bound ------------------------------------------------------------------------------------

def information_bound(deploy: Manifest, sigma: float | None = None) -> dict[str, Any]:
    """The manifest's bound: per view ``I <= B^2 / (2 sigma^2 ln 2)`` bits (a Gaussian channel
    with power ``B^2``), ``views_per_row`` views per token per query, so at most
    ``bits_per_token`` bits per token per query over all views; repeated queries add up."""
    plan = MaskedPlan.of(deploy)
    per_view = {shard_name(s): _view_bits(plan.shards[s.cid].input_norm_bound,
                                          plan.shards[s.cid].sigma if sigma is None else sigma)
                for s in deploy.node_shards}
    return {"bits_per_token_per_query": plan.bits_per_token,
            "views_per_row": plan.views_per_row,
            "per_view_bits_max": max(per_view.values()),
            "sum_over_views_bits": sum(per_view.values()),
            "formula": "per row and view: I(x; x + r) <= B^2 / (2 sigma^2 ln 2) bits, ||x|| <= "
                       "B, r ~ N(0, sigma^2 I); summed over the views_per_row views of a token: "
                       "<= bits_per_token per token per query, so <= rows x bits_per_token per "
                       "query; k queries of the same text: k times that",
            "sigma_override": sigma, "buckets": list(plan.buckets)}


def _view_bits(bound: float, sigma: float) -> float:
    return bound * bound / (2 * sigma * sigma * math.log(2))


# --- the audit ------------------------------------------------------------------------------------

def audit_masked(deploy: Manifest, plain: Manifest, texts: list[str], seed: int = 15,
                 progress: Progress = no_progress, sigma: float | None = None,
                 queries: Sequence[int] = QUERIES, train: int | None = None,
                 layers: Sequence[int] | None = None) -> AuditReport:
    """Every attack of the module docstring on ``texts``; ``sigma`` replaces every shard's mask
    scale (tests only: with a tiny sigma the same attacks must read the tokens); ``train``
    public sentences (default ``max(len(texts), 64)``) train the probes and the prior;
    ``layers``: whose node shard inputs are probed (default the first and the last)."""
    if sigma is not None and not sigma > 0:
        raise AuditError(f"sigma {sigma!r}: a mask's scale must be positive")
    plan = MaskedPlan.of(deploy)
    report = AuditReport(deploy.cid, deploy.encryption)
    report.bound = information_bound(deploy, sigma)
    emb = aa.EncoderEmbeddings.from_head(onnx.load(str(plain.shard_path(plain.head))))
    every = sorted({layer_kind(s)[0] for s in deploy.node_shards})
    layers = (every[0], every[-1]) if layers is None else layers
    probed = [s for s in deploy.node_shards if layer_kind(s)[0] in layers]
    first = first_qkv(deploy)
    sig = {s.cid: plan.shards[s.cid].sigma if sigma is None else sigma
           for s in deploy.node_shards}
    n_pub = max(len(texts), train or 64)  # other sentences than the held-out ones
    public = [t for t in heldout_sentences(len(texts) + n_pub, seed + 1) if t not in texts][:n_pub]
    start = time.perf_counter()
    progress(f"simulating what nodes receive for {len(texts)} held-out and {len(public)} "
             "public sentences")
    simulate = Simulator(deploy, {*probed, first})
    test, pub = simulate(texts), simulate(public)
    cands = Candidates(emb, test.positions)
    truth, base = test.ids, most_common_rate(test.ids)
    prior = token_prior(pub.ids, emb.word.shape[0])
    views = {s.cid: masked_view(test.x[s.cid], mask_seed(seed, s.cid), sig[s.cid])
             for s in {*probed, first}}
    common = {"tokens": int(truth.size), "texts": len(texts), "shard": shard_name(first),
              "sigma": sig[first.cid], "input_norm_bound": plan.shards[first.cid].input_norm_bound}
    progress(f"simulated in {time.perf_counter() - start:.1f} s")

    def rate(read: np.ndarray) -> float:
        return float(np.mean(read == truth)) if truth.size else 0.0

    timed(report, progress, "weight matching", "key", lambda: (
        0.0, 0.0, {"applicable": False, "note": NOT_APPLICABLE}))
    x0, s0 = test.x[first.cid], sig[first.cid]
    observed = {"one": (views[first.cid], s0)}
    observed.update({f"k={k}": (masked_view(x0, mask_seed(seed, f"mean/{k}"), s0 / math.sqrt(k)),
                                s0 / math.sqrt(k)) for k in queries if k > 1})
    # colluding B draws r from the seed the client sent it: (x + r) - r
    observed["collusion"] = (masked_view(views[first.cid], mask_seed(seed, first.cid), -s0), 0.0)
    reads: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def nearest() -> tuple[float, float, dict[str, Any]]:
        reads.update(read_nearest(cands, test.positions, observed, prior))
        return rate(reads["one"][0]), base, {**common, "scope": ONE, "note":
                                            "nearest LN(word + position + type) to x + r at "
                                            "each row's position (maximum likelihood)"}

    timed(report, progress, "nearest embedding (ML)", "input tokens", nearest)
    timed(report, progress, "nearest embedding (MAP)", "input tokens", lambda: (
        rate(reads["one"][1]), base, {**common, "scope": ONE, "note":
                                      "ML plus the log-frequency of each token in public text "
                                      "(the Bayes-optimal reader for Gaussian masks)"}))
    timed(report, progress, "keyless norms", "input tokens", lambda: (
        rate(read_norms(cands, test.positions, views[first.cid], s0)), base,
        {**common, "scope": ONE, "note": "row norm minus the mask's expected d sigma^2, "
                                         "nearest candidate norm"}))
    rng = np.random.default_rng(seed)
    for shard in probed:
        timed(report, progress, f"linear probe {shard_name(shard)}", "input tokens",
               lambda shard=shard: _probe(shard, pub, views, sig, truth, base, rng, rate))
    bound_first = plan.shards[first.cid].input_norm_bound
    for k in queries:
        key = "one" if k == 1 else f"k={k}"
        s = s0 / math.sqrt(k)
        bits = _view_bits(bound_first, s0) * k
        d = x0.shape[1]
        timed(report, progress, f"averaging {k} queries", "input tokens", lambda k=k, key=key,
               s=s, bits=bits, d=d: (rate(reads[key][0]), base, {
                   **common, "queries": k,
                   "scope": ONE if k == 1 else f"one node, {k} queries of the same text",
                   "map": rate(reads[key][1]), "effective_sigma": s,
                   "bound_bits_this_view": bits,
                   "bound_bits_gaussian": d / 2 * math.log2(1 + bound_first ** 2 / (d * s * s)),
                   "bound_bits_all_views": k * plan.bits_per_token,
                   "note": "mean of k views of the layer-0 qkv input: exactly N(x, sigma^2/k), "
                           "drawn as one mask of sigma/sqrt(k); nearest embedding (ML), MAP "
                           "in 'map'"}))
    timed(report, progress, "length and padding", "sequence length",
           lambda: _length(deploy, test, pub, first))
    timed(report, progress, COLLUSION, "input tokens", lambda: (
        rate(reads["collusion"][0]), base, {
            **common, "scope": "two colluding nodes, one query",
            "note": "A holds x + r, B draws r from its seed: (x + r) - r = x exactly; then "
                    "nearest embedding. The cost of breaking the non-collusion assumption"}))
    return report


def _probe(shard: ShardSpec, pub: Traffic, views: dict[str, np.ndarray],
           sig: dict[str, float], truth: np.ndarray, base: float, rng: np.random.Generator,
           rate: Callable[[np.ndarray], float]) -> tuple[float, float, dict[str, Any]]:
    x = pub.x[shard.cid]
    train = x + rng.normal(0.0, sig[shard.cid], x.shape) if sig[shard.cid] > 0 else x
    probe = RidgeProbe(train, pub.ids, rng)
    return rate(probe.predict(views[shard.cid])), base, {
        "tokens": int(truth.size), "shard": shard_name(shard), "sigma": sig[shard.cid],
        "train_rows": len(pub.ids), "classes": len(probe.classes),
        "penalty": None if math.isinf(probe.penalty) else probe.penalty,
        "scope": ONE,
        "note": "ridge on one-hot token ids, trained on public text's views masked by the "
                "attacker's own simulation; infinite penalty = the most common public token"}


def _length(deploy: Manifest, test: Traffic, pub: Traffic,
            first: ShardSpec) -> tuple[float, float, dict[str, Any]]:
    """A text sent alone shows its bucket (rows = bucket); the best guess of its length is the
    most common public length in that bucket."""
    def bucket(n: int) -> int:
        return bucket_length(deploy, int(n))

    by_bucket: dict[int, Counter[int]] = defaultdict(Counter)
    for n in pub.lengths:
        by_bucket[bucket(n)][int(n)] += 1
    guess = [by_bucket[bucket(n)].most_common(1)[0][0] if by_bucket[bucket(n)] else bucket(n)
             for n in test.lengths]
    seen = Counter(bucket(n) for n in test.lengths)
    total = sum(seen.values())
    entropy = -sum(c / total * math.log2(c / total) for c in seen.values())
    return float(np.mean(np.array(guess) == test.lengths)), most_common_rate(test.lengths), {
        "texts": len(test.lengths), "buckets_seen": dict(sorted(seen.items())),
        "bucket_bits": round(entropy, 3), "first_node_inputs": [shard_name(first)],
        "mask_sent": False, "requests": [list(r) for r in test.requests],
        "note": "a node sees rows = batch x bucket, never the attention mask: one text per "
                "request shows its bucket, not its length; the guess is the most common public "
                "length in that bucket"}


def best_single_node(report: AuditReport) -> float:
    """The best token-recovery rate of one node in one query (every scored row but averaging
    over repeated queries and collusion)."""
    return max(r.success for r in report.rows if r.target == "input tokens"
               and r.detail.get("scope") == ONE)


__all__ = ["COLLUSION", "QUERIES", "Candidates", "Simulator", "Traffic",
           "audit_masked", "best_single_node", "first_qkv", "information_bound", "layer_kind",
           "mask_seed", "masked_view", "read_nearest", "read_norms", "shard_name",
           "token_prior"]
