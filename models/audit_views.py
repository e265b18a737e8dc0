"""``veilnet audit DEPLOY --views DIR``: the audit's attacks run on exactly what a node recorded
with ``veilnet node start --record-received DIR`` (models/received.py), instead of on the
audit's own simulated traffic (models/audit.py; docs/threat-model.md, "Auditing a deployment").

For an ``ee-encoder/1`` deployment, every recorded request to the deployment's first node shard
(the one that receives the client head's first hidden state) is attacked as the suite attacks
its simulated traffic: keyless sorting, and decryption with the key recovered from the public
weights followed by nearest-embedding reading. The recorded texts are unknown, so the ground
truth is what the owner reads with the real key: ``client/key.json``'s hidden permutation undoes
the encryption and the nearest row of the plaintext model's embeddings (at each position) gives
the token id. Views of the other node shards are counted and reported as not attacked yet.

For a ``masked/1`` deployment (``--views`` once per node: ``audit_views`` takes several
directories), each node's recorded layer-0 ``qkv`` views are attacked alone (nearest embedding,
ML and MAP, and a linear probe), and every pair of nodes pooled (collusion: ``x + r`` minus
``r``). The owner's secret is the mask, which only the other node of each call drew, so the
ground truth is ``x = (x + r) - r`` over every directory given, read by nearest embedding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tokenizers import Tokenizer

from crypto.ee_key import EEKey
from models import audit_attacks as aa
from models.audit_attacks import RidgeProbe
from models.audit_masked import (
    Candidates,
    Simulator,
    first_qkv,
    information_bound,
    layer_kind,
    read_nearest,
    shard_name,
    token_prior,
)
from models.audit_report import (
    AuditError,
    AuditReport,
    client_file,
    heldout_sentences,
    load_key,
    most_common_rate,
    plain_model,
    special_ids,
    timed,
)
from models.ee_attack import recover_key
from models.ee_plan import plan_encryption
from models.importer import Progress, no_progress
from models.manifest import EE_ENCODER, MASKED, Manifest, ShardSpec
from models.masked import MaskedPlan
from models.received import RecordedView, read_views

HIDDEN, BIAS = "hidden_0", "attention_bias"  # what the first node shard of ee-encoder/1 receives
PUBLIC = 64  # public sentences (seed 16) the masked/1 probe and prior are trained on


def split_views(views: list[RecordedView], deploy: Manifest,
                ) -> tuple[list[RecordedView], dict[str, list[RecordedView]], int]:
    """``(first node shard's views, other node shards' views by CID, views of no node shard of
    this deployment)``."""
    first = deploy.node_shards[0].cid
    others: dict[str, list[RecordedView]] = {s.cid: [] for s in deploy.node_shards[1:]}
    attacked, foreign = [], 0
    for view in views:
        if view.shard == first:
            attacked.append(view)
        elif view.shard in others:
            others[view.shard].append(view)
        else:
            foreign += 1
    return attacked, others, foreign


def _received(view: RecordedView, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(hidden [batch, seq, d], visible [batch, seq])`` of one recorded request."""
    names = {i.name for i in view.inputs}
    if not {HIDDEN, BIAS} <= names:
        raise AuditError(f"{view.root}: request {view.request_id} to the first node shard has "
                         f"inputs {sorted(names)}, not {HIDDEN} and {BIAS}")
    got = view.load()
    hidden, bias = np.asarray(got[HIDDEN]), np.asarray(got[BIAS])
    if hidden.ndim != 3 or hidden.shape[-1] != width or bias.ndim != 4 \
            or bias.shape[0] != hidden.shape[0] or bias.shape[-1] != hidden.shape[1]:
        raise AuditError(f"{view.root}: request {view.request_id}: {HIDDEN} {hidden.shape} "
                         f"and {BIAS} {bias.shape} are not a [batch, seq, {width}] state and "
                         "its [batch, 1, 1, seq] mask")
    return hidden, bias[:, 0, 0, :] >= 0  # padding is what the node sees masked


def audit_views(deploy_dir: Path, views_dir: Path | Sequence[Path], model_dir: Path | None = None,
                progress: Progress = no_progress) -> AuditReport:
    """Attack the recorded views in ``views_dir`` (one directory, or one per node) of the
    deployment in ``deploy_dir``; score against what the owner reads with its secret: the real
    key (``ee-encoder/1``) or the masks the other node drew (``masked/1``, below); rows with
    ``source == "views"``."""
    deploy = Manifest.load(Path(deploy_dir))
    dirs = [Path(views_dir)] if isinstance(views_dir, str | Path) else [Path(d) for d in views_dir]
    if not dirs:
        raise AuditError("--views: no directory given")
    if deploy.encryption == MASKED:
        report = _audit_masked(deploy, dirs, model_dir, progress)
        for row in report.rows:
            row.source = "views"
        return report
    key_path = load_key(deploy)
    if deploy.encryption != EE_ENCODER:
        raise AuditError(f"{deploy.path}: --views audits only {EE_ENCODER} and {MASKED} "
                         f"deployments so far, not {deploy.encryption}")
    where = str(dirs[0]) if len(dirs) == 1 else ", ".join(map(str, dirs))
    views = [v for d in dirs for v in read_views(d)]
    attacked, others, foreign = split_views(views, deploy)
    if not attacked and not any(others.values()):
        found = sorted({str(v.shard) for v in views})
        raise AuditError(f"{where}: no recorded views of this deployment's node shards "
                         f"({', '.join(s.cid for s in deploy.node_shards)}); shards found: "
                         f"{', '.join(found) if found else 'none (no views)'}")
    report = AuditReport(deploy.cid, deploy.encryption)
    report.views = {
        "dir": where if len(dirs) == 1 else [str(d) for d in dirs],
        "views": len(views),
        "attacked": {"shard": deploy.node_shards[0].cid, "views": len(attacked)},
        "not_attacked_yet": [{"shard": cid, "views": len(v),
                              "ops": dict(Counter(x.op for x in v))}
                             for cid, v in others.items() if v],
        "other_shards": foreign}
    if not attacked:
        progress(f"no views of the first node shard in {where}: nothing attacked yet")
        return report
    with plain_model(deploy, model_dir, progress) as plain:
        _attack(report, deploy, plain, key_path, attacked, progress)
    for row in report.rows:
        row.source = "views"
    return report


def _attack(report: AuditReport, deploy: Manifest, plain: Manifest, key_path: Path,
            views: list[RecordedView], progress: Progress) -> None:
    key = EEKey.load(key_path)
    hidden_true = key.perm("hidden").perm
    emb = aa.EncoderEmbeddings.from_head(onnx.load(str(plain.shard_path(plain.head))))
    received = [_received(v, len(hidden_true)) for v in views]
    special = list(special_ids(client_file(deploy, "tokenizer")))

    # ground truth: what the owner reads with the real key (positions the node sees, no specials)
    truths = [aa.read_encoder_tokens(aa.apply_perm(h, hidden_true), vis, emb, sort=False)
              for h, vis in received]
    counted = [(t >= 0) & ~np.isin(t, special) for t in truths]
    truth = np.concatenate([t[c] for t, c in zip(truths, counted, strict=True)])
    base = most_common_rate(truth)
    common = {"tokens": int(truth.size), "requests": len(views),
              "ground_truth": "decrypted with client/key.json, nearest plaintext embedding"}

    def rate(read: list[np.ndarray]) -> float:
        got = np.concatenate([r[c] for r, c in zip(read, counted, strict=True)])
        return float(np.mean(got == truth)) if truth.size else 0.0

    plain_models = {s.index: onnx.load(str(plain.shard_path(s))) for s in plain.node_shards}
    enc_models = {s.index: onnx.load(str(deploy.shard_path(s))) for s in deploy.node_shards}
    plan = plan_encryption(sorted(plain_models.items()))  # from the public graph alone
    recovered: dict[str, np.ndarray] = {}

    def exact_key() -> tuple[float, float, dict[str, Any]]:
        got = recover_key(plan, plain_models, enc_models, key)  # key used only to score
        assert got.recovered_hidden_perm is not None
        recovered["hidden"] = perm = got.recovered_hidden_perm
        return float(np.mean(perm == hidden_true)), 1 / len(hidden_true), {
            "note": "hidden permutation recovered from the public weights"}

    def exact_tokens() -> tuple[float, float, dict[str, Any]]:
        perm = recovered["hidden"]
        if np.any(perm < 0):
            return 0.0, base, {**common, "note": "no hidden permutation"}
        return rate([aa.read_encoder_tokens(aa.apply_perm(h, perm), vis, emb, sort=False)
                     for h, vis in received]), base, common

    def keyless() -> tuple[float, float, dict[str, Any]]:
        return rate([aa.read_encoder_tokens(h, vis, emb, sort=True) for h, vis in received]), \
            base, {**common, "method": "sorted values vs sorted embeddings"}

    timed(report, progress, "exact weight matching", "hidden permutation", exact_key)
    timed(report, progress, "exact weight matching", "input tokens", exact_tokens)
    timed(report, progress, "keyless sort", "input tokens", keyless)


# --- masked/1 -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Seen:
    """One recorded node-shard call: ``x + r`` (op ``infer``) or ``r`` (``infer-mask-seed``)."""

    node: int  # index of the --views directory (one node's recording)
    view: RecordedView
    shard: ShardSpec
    data: np.ndarray  # [rows, d] float64

    @property
    def masked(self) -> bool:
        return self.view.op == "infer"


def _load_masked(deploy: Manifest, dirs: list[Path]) -> tuple[list[_Seen], int]:
    by_cid = {s.cid: s for s in deploy.node_shards}
    seen, foreign = [], 0
    for node, root in enumerate(dirs):
        for view in read_views(root):
            shard = by_cid.get(view.shard or "")
            if shard is None or view.op not in ("infer", "infer-mask-seed"):
                foreign += 1
                continue
            data = view.load().get(shard_name(shard))
            if not isinstance(data, np.ndarray) or data.ndim != 2:
                raise AuditError(f"{root}: request {view.request_id} to {shard_name(shard)} holds "
                                 "no [rows, d] tensor of that name")
            seen.append(_Seen(node, view, shard, np.asarray(data, np.float64)))
    return seen, foreign


def pair_views(seen: list[_Seen], plan: MaskedPlan) -> list[tuple[_Seen, _Seen]]:
    """``(x + r, r)`` pairs: an ``infer`` view and an ``infer-mask-seed`` view of the same shard
    and shape whose difference has every row within the shard's ``input_norm_bound`` (a wrong
    pairing leaves a row norm near ``sigma sqrt(2 d)``, hundreds of times the bound)."""
    masks = [m for m in seen if not m.masked]
    pairs, used = [], set()
    for a in (v for v in seen if v.masked):
        bound = plan.shards[a.shard.cid].input_norm_bound * (1 + 1e-6) + 1e-9
        for i, m in enumerate(masks):
            if i not in used and m.shard.cid == a.shard.cid and m.data.shape == a.data.shape \
                    and float(np.linalg.norm(a.data - m.data, axis=1).max()) <= bound:
                pairs.append((a, m))
                used.add(i)
                break
    return pairs


def fit_bucket(x: np.ndarray, buckets: Sequence[int], cls_row: np.ndarray) -> int:
    """The sequence length of unmasked layer-0 rows: the smallest bucket ``b`` dividing the
    rows whose rows ``0, b, 2b, ...`` are all ``[CLS]`` at position 0 (else: one text)."""
    tol = 1e-3 * float(np.linalg.norm(cls_row))
    for b in buckets:
        if len(x) % b == 0 and float(np.linalg.norm(x[::b] - cls_row, axis=1).max()) <= tol:
            return b
    return len(x)


def _audit_masked(deploy: Manifest, dirs: list[Path], model_dir: Path | None,
                  progress: Progress) -> AuditReport:
    """One node's recorded views attacked alone (nearest embedding, ML and MAP, and the linear
    probe on the layer-0 ``qkv`` input, whether it held ``x + r`` or the mask ``r``), and each
    pair of nodes pooled (collusion). Ground truth: the owner's reading of ``x = (x + r) - r``
    over every directory given (nearest plaintext embedding at each position, padding and
    special tokens not counted); a view whose other half is in no directory is not scored."""
    plan = MaskedPlan.of(deploy)
    seen, foreign = _load_masked(deploy, dirs)
    if not seen:
        raise AuditError(f"{', '.join(map(str, dirs))}: no recorded views of this deployment's "
                         f"{len(deploy.node_shards)} node shards")
    first = first_qkv(deploy)
    pairs = pair_views(seen, plan)
    tok_path = client_file(deploy, "tokenizer")
    special = list(special_ids(tok_path))
    cls_id = Tokenizer.from_file(str(tok_path)).token_to_id("[CLS]")
    report = AuditReport(deploy.cid, deploy.encryption)
    report.bound = information_bound(deploy)
    unscored: list[str] = []
    report.views = {
        "dirs": [str(d) for d in dirs], "views": len(seen), "other_shards": foreign,
        "nodes": [{"dir": str(d), **Counter(f"{layer_kind(v.shard)[1]}/{v.view.op}"
                                            for v in seen if v.node == i)}
                  for i, d in enumerate(dirs)],
        "paired": len(pairs), "unpaired": len(seen) - 2 * len(pairs), "unscored": unscored}
    firsts = [(a, m) for a, m in pairs if a.shard.cid == first.cid]
    if not firsts:
        unscored.append("no layer-0 qkv view could be paired with its mask: the ground truth "
                        "x = (x + r) - r needs both nodes' recordings (pass each with --views)")
        return report
    with plain_model(deploy, model_dir, progress) as plain:
        emb = aa.EncoderEmbeddings.from_head(onnx.load(str(plain.shard_path(plain.head))))
    # the owner's reading of every paired layer-0 call: (A, B, positions, truth, counted)
    cls_row = emb.at(0)[cls_id].astype(np.float64)
    calls = []
    for a, m in firsts:
        x = a.data - m.data
        pos = np.arange(len(x)) % fit_bucket(x, plan.buckets, cls_row)
        calls.append((a, m, x, pos))
    cands = Candidates(emb, np.concatenate([c[3] for c in calls]))
    truths = [read_nearest(cands, pos, {"x": (x, 0.0)})["x"][0] for _, _, x, pos in calls]
    counted = [~np.isin(t, special) for t in truths]
    report.views["ground_truth"] = {"requests": len(calls),
                                    "tokens": int(sum(c.sum() for c in counted))}
    sigma = plan.shards[first.cid].sigma
    progress("training the probe and the prior on public text's simulated views")
    public = Simulator(deploy, [first])(heldout_sentences(PUBLIC, seed=16))
    prior = token_prior(public.ids, emb.word.shape[0])
    rng = np.random.default_rng(16)
    probe = RidgeProbe(public.x[first.cid] + rng.normal(0.0, sigma, public.x[first.cid].shape),
                       public.ids, rng)

    def scored(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(observed rows, positions, truth) at the counted rows of (data, pos, truth, counted)."""
        return (np.concatenate([d[c] for d, _, _, c in parts]),
                np.concatenate([p[c] for _, p, _, c in parts]),
                np.concatenate([t[c] for _, _, t, c in parts]))

    for node, root in enumerate(dirs):
        parts = [(v.data, pos, t, c) for (a, m, _, pos), t, c in zip(calls, truths, counted,
                                                                     strict=True)
                 for v in (a, m) if v.node == node]
        if not parts:
            unscored.append(f"{root}: no layer-0 qkv view (as x + r or as the mask) of a call "
                            "whose other half was recorded")
            continue
        obs, pos, truth = scored(parts)
        base = most_common_rate(truth)
        common = {"dir": str(root), "tokens": int(truth.size), "views": len(parts),
                  "masked_inputs": sum(1 for (a, _, _, _) in calls if a.node == node),
                  "masks": sum(1 for (_, m, _, _) in calls if m.node == node), "sigma": sigma,
                  "scope": "one node, its recorded views"}
        ml, mp = read_nearest(cands, pos, {"v": (obs, sigma)}, prior)["v"]
        for attack, read, note in (
                ("nearest embedding (ML)", ml, "nearest LN(word + position + type) to each "
                 "recorded row at its position (positions given)"),
                ("nearest embedding (MAP)", mp, "ML plus the public-text log-frequency of each "
                 "token"),
                (f"linear probe {shard_name(first)}", probe.predict(obs), "ridge trained on "
                 "public text's simulated views at the deployment's sigma")):
            timed(report, progress, f"{attack} [views {node + 1}]", "input tokens",
                   lambda read=read, note=note, base=base, truth=truth, common=common: (
                       float(np.mean(read == truth)), base, {**common, "note": note}))
    for i, j in combinations(range(len(dirs)), 2):
        mine = [k for k, (a, m, _, _) in enumerate(calls) if {a.node, m.node} == {i, j}]
        if not mine:
            unscored.append(f"collusion of {dirs[i]} and {dirs[j]}: no call of the layer-0 qkv "
                            "shard has one half in each")
            continue
        parts = []
        for k in mine:
            x = calls[k][0].data - calls[k][1].data  # pooled: A's x + r minus B's r
            pos = np.arange(len(x)) % fit_bucket(x, plan.buckets, cls_row)
            parts.append((read_nearest(cands, pos, {"x": (x, 0.0)})["x"][0], pos, truths[k],
                          counted[k]))
        read, _, truth = scored(parts)
        recovered = sum(1 for a, m in pairs if {a.node, m.node} == {i, j})
        pooled = [str(dirs[i]), str(dirs[j])]
        timed(report, progress, f"collusion [views {i + 1}+{j + 1}]", "input tokens",
               lambda read=read, truth=truth, mine=mine, recovered=recovered, pooled=pooled: (
                   float(np.mean(read == truth)), most_common_rate(truth), {
                       "dirs": pooled, "tokens": int(truth.size),
                       "requests": len(mine), "activations_recovered": recovered,
                       "scope": "two colluding nodes, their recorded views",
                       "note": "pooled x + r and r: every paired call's input x exactly, at "
                               "every node shard; layer-0 rows read by nearest embedding"}))
    return report


__all__ = ["audit_views", "fit_bucket", "pair_views", "split_views"]
