"""``veilnet audit``: measure what a node serving a deployment can read (docs/threat-model.md,
"Auditing a deployment").

The deployment owner holds DEPLOY (with ``client/key.json``) and the public plaintext model it
was encrypted from. Each attack is run as a node would run it: on the node's encrypted shards,
on what the client sends the first node for held-out text, and on the public weights (exact, or
perturbed as a fine-tune would perturb them). The true key and token ids are used only to score.

Rows (``AuditRow``): ``success`` is the measured rate, ``baseline`` what a best constant guess
gets (the most common token of the sample; for a permutation, a random guess's expected 1/n).
The held-out text is the stdlib's help texts (``pydoc_data.topics``), nothing downloaded.
``masked/1`` deployments (no key) are audited by models/audit_masked.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from tokenizers import Tokenizer

from crypto.ee_key import EEKey
from models import audit_attacks as aa
from models import ee_decoder_attack as dec
from models.audit_masked import audit_masked
from models.audit_probe import PUBLIC_FACTOR, probe_rows
from models.audit_report import (
    MAX_TOKENS,
    AuditError,
    AuditReport,
    AuditRow,
    client_file,
    heldout_sentences,
    load_key,
    most_common_rate,
    plain_model,
    special_ids,
    timed,
)
from models.ee_attack import recover_key
from models.ee_decoder import weight_name
from models.ee_decoder_key import DecoderDims, DecoderKey
from models.ee_plan import plan_encryption
from models.importer import Progress, no_progress
from models.manifest import EE_ENCODER, MASKED, Manifest
from models.runtime import ShardSession
from models.tokenizer import TextTokenizer

PUBLIC_SEED = 16  # the public text a probe trains on (held-out text uses the audit's seed)
NOISE_LEVELS = (0.1, 0.5, 1.0)  # dense Gaussian noise, relative to each tensor's RMS
LOW_RANK = 8  # rank of the LoRA-like delta
LOW_RANK_SIZE = 0.1  # its Frobenius norm relative to the weight's
# --- inputs ---------------------------------------------------------------------------------------

def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float64)
            for t in onnx.load(str(path)).graph.initializer}


def audit_deployment(deploy_dir: Path, model_dir: Path | None = None, sample: int = 200,
                     seed: int = 15, noise: Sequence[float] = NOISE_LEVELS,
                     progress: Progress = no_progress) -> AuditReport:
    """Run every attack on the deployment in ``deploy_dir`` and score it."""
    if sample < 1:
        raise AuditError(f"--sample must be at least 1, not {sample}")
    deploy = Manifest.load(Path(deploy_dir))
    texts = heldout_sentences(sample, seed)
    if deploy.encryption == MASKED:  # no key: the masks are drawn per query
        with plain_model(deploy, model_dir, progress) as plain:
            return audit_masked(deploy, plain, texts, seed, progress)
    key_path = load_key(deploy)
    with plain_model(deploy, model_dir, progress) as plain:
        report = AuditReport(deploy.cid, deploy.encryption)
        run = _audit_encoder if deploy.encryption == EE_ENCODER else _audit_decoder
        run(report, deploy, plain, key_path, texts, noise, np.random.default_rng(seed), progress)
    return report


def _perturbations(noise: Sequence[float]) -> list[tuple[str, float | None]]:
    return [(f"robust matching, dense d={d:g}", d) for d in noise] + \
        [(f"robust matching, rank-{LOW_RANK} delta", None)]


# --- ee-encoder/1 ---------------------------------------------------------------------------------

def _audit_encoder(report: AuditReport, deploy: Manifest, plain: Manifest, key_path: Path,
                   texts: list[str], noise: Sequence[float], rng: np.random.Generator,
                   progress: Progress) -> None:
    key = EEKey.load(key_path)
    plain_models = {s.index: onnx.load(str(plain.shard_path(s))) for s in plain.node_shards}
    enc_models = {s.index: onnx.load(str(deploy.shard_path(s))) for s in deploy.node_shards}
    plan = plan_encryption(sorted(plain_models.items()))  # from the public graph alone
    pw = {i: _initializers(plain.shard_path(plain.shards[i])) for i in plain_models}
    ew = {i: _initializers(deploy.shard_path(deploy.shards[i])) for i in enc_models}
    emb = aa.EncoderEmbeddings.from_head(onnx.load(str(plain.shard_path(plain.head))))

    # what the first node receives for the held-out text (the owner's client head runs it)
    tok_path = client_file(deploy, "tokenizer")
    feeds = TextTokenizer(tok_path, MAX_TOKENS)(texts)
    head = ShardSession(deploy.shard_path(deploy.head), deploy.head, spin=False)
    sent = head.run({t.name: feeds[t.name] for t in deploy.head.inputs})
    received, bias = sent["hidden_0"], sent["attention_bias"]
    visible = bias[:, 0, 0, :] >= 0  # what the node knows is not padding
    ids = feeds["input_ids"]
    counted = (feeds["attention_mask"] == 1) & ~np.isin(ids, list(special_ids(tok_path)))
    truth = ids[counted]
    base_tok = most_common_rate(truth)

    def token_rate(read: np.ndarray) -> float:
        return float(np.mean(read[counted] == truth))

    hidden_true = key.perm("hidden").perm
    perm_sizes = dict(plan.perm_sizes)
    n_entries = sum(perm_sizes.values()) + sum(h for h, _ in plan.attention_dims.values())
    # a random guess of each permutation gets one entry right on average
    chance = (len(perm_sizes) + len(plan.attention_dims)) / n_entries
    recovered: dict[str, np.ndarray] = {}

    def exact_key() -> tuple[float, float, dict[str, Any]]:
        got = recover_key(plan, plain_models, enc_models, key)  # key used only to score
        assert got.recovered_hidden_perm is not None
        recovered["hidden"] = got.recovered_hidden_perm
        s = got.summary()
        parts = [(got.hidden_perm, perm_sizes["hidden"])]
        parts += [(v, perm_sizes[k]) for k, v in got.ffn_perms.items()]
        parts += [(v, plan.attention_dims[k][0]) for k, v in got.head_perms.items()]
        frac = sum(v * n for v, n in parts) / n_entries
        return frac, chance, {**s, "permutation_entries": n_entries}

    timed(report, progress, "exact weight matching", "key", exact_key)

    def exact_tokens() -> tuple[float, float, dict[str, Any]]:
        perm = recovered["hidden"]
        if np.any(perm < 0):
            return 0.0, base_tok, {"tokens": int(truth.size), "note": "no hidden permutation"}
        read = aa.read_encoder_tokens(aa.apply_perm(received, perm), visible, emb, sort=False)
        return token_rate(read), base_tok, {"tokens": int(truth.size), "texts": len(texts)}

    timed(report, progress, "exact weight matching", "input tokens", exact_tokens)

    linear = {i: [n for n, op in plan.weight_ops[i].items() if op.op == "matmul"] for i in pw}
    every = {i: list(plan.weight_ops[i]) for i in pw}
    for label, size in _perturbations(noise):
        if size is None:
            p_w = {i: aa.perturb_low_rank(pw[i], linear[i], LOW_RANK, LOW_RANK_SIZE, rng)
                   for i in pw}
            p_emb = emb  # LoRA leaves the embeddings and LayerNorms bit-identical
        else:
            p_w = {i: aa.perturb_dense(pw[i], every[i], size, rng) for i in pw}
            p_emb = emb.replaced(aa.perturb_dense(emb.weights(), aa.EncoderEmbeddings.NAMES,
                                                  size, rng))
        got: dict[str, aa.RobustKey] = {}

        def robust_key(p_w: dict[int, dict[str, np.ndarray]] = p_w, size: float | None = size,
                       got: dict[str, aa.RobustKey] = got,
                       ) -> tuple[float, float, dict[str, Any]]:
            got["key"] = k = aa.robust_recover(plan, p_w, ew)
            ffn = {s: float(np.mean(v == key.perm(s).perm)) for s, v in k.ffn.items()}
            heads = {s: float(np.mean(v == key.attention(s).head_perm))
                     for s, v in k.heads.items()}
            return float(np.mean(k.hidden == hidden_true)), 1 / len(hidden_true), {
                "ffn_perms_mean": float(np.mean(list(ffn.values()))),
                "head_perms_mean": float(np.mean(list(heads.values()))),
                "perturbation": _describe(size)}

        def robust_tokens(p_emb: aa.EncoderEmbeddings = p_emb, size: float | None = size,
                          got: dict[str, aa.RobustKey] = got,
                          ) -> tuple[float, float, dict[str, Any]]:
            plain_guess = aa.apply_perm(received, got["key"].hidden)
            read = aa.read_encoder_tokens(plain_guess, visible, p_emb, sort=False)
            return token_rate(read), base_tok, {"tokens": int(truth.size),
                                                "perturbation": _describe(size)}

        timed(report, progress, label, "hidden permutation", robust_key)
        timed(report, progress, label, "input tokens", robust_tokens)

    def keyless() -> tuple[float, float, dict[str, Any]]:
        read = aa.read_encoder_tokens(received, visible, emb, sort=True)
        return token_rate(read), base_tok, {"tokens": int(truth.size),
                                            "method": "sorted values vs sorted embeddings"}

    timed(report, progress, "keyless sort", "input tokens", keyless)
    if recovered["hidden"].min() >= 0:  # decrypt-then-probe at every node shard's input
        public = heldout_sentences(max(PUBLIC_FACTOR * len(texts), 200), seed=PUBLIC_SEED)
        held_out = set(texts)
        public = [t for t in public if t not in held_out]
        rows = probe_rows(deploy, plain, TextTokenizer(tok_path, MAX_TOKENS), feeds, counted,
                          public, recovered["hidden"], special_ids(tok_path), rng)
        for label, run in rows:
            def scored(run: Callable[[], tuple[float, dict]] = run,
                       ) -> tuple[float, float, dict[str, Any]]:
                rate, detail = run()
                return rate, base_tok, detail

            timed(report, progress, label, "input tokens", scored)
    first = deploy.node_shards[0]
    lengths = feeds["attention_mask"].sum(axis=1)  # each text's token count
    timed(report, progress, "length and padding", "sequence length", lambda: (
        float(np.mean(visible.sum(axis=1) == lengths)), most_common_rate(lengths),
        {"first_node_inputs": [t.name for t in first.inputs],
         "mask_sent": "attention_bias" in {t.name for t in first.inputs},
         "padding_visible": True}))


def _describe(size: float | None) -> str:
    if size is None:
        return f"rank-{LOW_RANK} delta of relative norm {LOW_RANK_SIZE:g} on the linear weights"
    return f"dense Gaussian noise of relative size {size:g} on every weight"


# --- ee-decoder/1 ---------------------------------------------------------------------------------

def _audit_decoder(report: AuditReport, deploy: Manifest, plain: Manifest, key_path: Path,
                   texts: list[str], noise: Sequence[float], rng: np.random.Generator,
                   progress: Progress) -> None:
    key = DecoderKey.load(key_path)
    dims = DecoderDims.from_config(deploy.extra["config"])
    table = next(iter(_initializers(plain.shard_path(plain.head)).values()))
    pw = {e.index: dec.blk_weights(_initializers(plain.shard_path(p)))
          for p, e in zip(plain.node_shards, deploy.node_shards, strict=True)}
    ew = {e.index: dec.blk_weights(_initializers(deploy.shard_path(e)))
          for e in deploy.node_shards}
    layers = {i: sorted({int(n.split(".")[1]) for n in w}) for i, w in pw.items()}
    first = deploy.node_shards[0].index

    tok_path = client_file(deploy, "tokenizer")
    tok, special = Tokenizer.from_file(str(tok_path)), special_ids(tok_path)
    head = ShardSession(deploy.shard_path(deploy.head), deploy.head, spin=False)
    ids_list, rows = [], []
    for text in texts:  # one text per request, as the client sends them (no padding)
        row = np.array([tok.encode(text).ids[:MAX_TOKENS]], np.int64)
        ids_list.append(row[0])
        rows.append(head.run({"input_ids": row})["hidden_embed"][0])
    ids, received = np.concatenate(ids_list), np.concatenate(rows)
    counted = ~np.isin(ids, list(special))
    truth = ids[counted]
    base_tok = most_common_rate(truth)
    parts = ("ffn_perm", "ffn_scale", "kv_perm", "q_perm", "rope_factor", "value_mix",
             "rotation")
    rotation: dict[str, np.ndarray] = {}

    def exact_key() -> tuple[float, float, dict[str, Any]]:
        scores = {}
        for i in pw:
            got = dec.recover_shard_key(pw[i], ew[i], layers[i], dims)
            if i == first:
                rotation["exact"] = got.rotation
            scores[i] = dec.score_shard(got, key, i)  # the key only scores
        frac = float(np.mean([s[p] for s in scores.values() for p in parts]))
        return frac, 1 / dims.ffn, {
            "shards": {str(i): {p: s[p] for p in (*parts, "rotation_rel_error")}
                       for i, s in scores.items()}}

    timed(report, progress, "exact weight matching", "key", exact_key)

    def read(rot: np.ndarray, tab: np.ndarray) -> float:
        return float(np.mean(dec.nearest_tokens(received @ rot.T, tab)[counted] == truth))

    timed(report, progress, "exact weight matching", "input tokens", lambda: (
        read(rotation["exact"], table), base_tok, {"tokens": int(truth.size)}))

    names = list(pw[first])
    for label, size in _perturbations(noise):
        if size is None:
            p_w = aa.perturb_low_rank(pw[first], names, LOW_RANK, LOW_RANK_SIZE, rng)
            p_table = table
        else:
            p_w = aa.perturb_dense(pw[first], names, size, rng)
            p_table = aa.perturb_dense({"t": table}, ["t"], size, rng)["t"]

        def robust_key(p_w: dict[str, np.ndarray] = p_w, size: float | None = size,
                       ) -> tuple[float, float, dict[str, Any]]:
            start = time.perf_counter()
            gate = (p_w[weight_name(layers[first][0], "ffn_norm")][:, None]
                    * p_w[weight_name(layers[first][0], "ffn_gate")])
            rot, _ = aa.robust_rotation(gate, ew[first][weight_name(layers[first][0], "ffn_gate")])
            got = dec.RecoveredShard(rot, {i: dec.recover_layer(p_w, ew[first], i, rot, dims)
                                           for i in layers[first]})
            got.seconds = time.perf_counter() - start
            rotation[str(size)] = got.rotation
            s = dec.score_shard(got, key, first)
            return s["ffn_perm"], 1 / dims.ffn, {
                "shard": first, "rotation_rel_error": s["rotation_rel_error"],
                "kv_perm": s["kv_perm"], "q_perm": s["q_perm"],
                "perturbation": _describe(size)}

        timed(report, progress, label, "FFN permutation", robust_key)
        timed(report, progress, label, "input tokens", lambda p_table=p_table, size=size: (
            read(rotation[str(size)], p_table), base_tok,
            {"tokens": int(truth.size), "perturbation": _describe(size)}))

    timed(report, progress, "keyless norms", "input tokens", lambda: (
        float(np.mean(dec.tokens_by_norm(received, table)[counted] == truth)), base_tok,
        {"tokens": int(truth.size), "method": "row norm of hidden_embed"}))
    lengths = np.array([len(r) for r in ids_list])
    seen = np.array([r.shape[0] for r in rows])
    node_inputs = [t.name for t in deploy.node_shards[0].inputs]
    timed(report, progress, "length and padding", "sequence length", lambda: (
        float(np.mean(seen == lengths)), most_common_rate(lengths),
        {"first_node_inputs": [*node_inputs[:3], "..."], "mask_sent": False,
         "note": "no padding: one text per request, its length is the sequence axis; the "
                 "KV cache's length gives the tokens per step"}))


__all__ = ["MAX_TOKENS", "NOISE_LEVELS", "AuditError", "AuditReport", "AuditRow",
           "audit_deployment", "heldout_sentences", "most_common_rate"]
