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
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from crypto.ee_key import EEKey
from models import audit_attacks as aa
from models.audit import (
    AuditError,
    AuditReport,
    _client_file,
    _load_key,
    _plain_model,
    _special_ids,
    _timed,
    most_common_rate,
)
from models.ee_attack import recover_key
from models.ee_plan import plan_encryption
from models.importer import Progress, no_progress
from models.manifest import EE_ENCODER, Manifest
from models.received import RecordedView, read_views

HIDDEN, BIAS = "hidden_0", "attention_bias"  # what the first node shard of ee-encoder/1 receives


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


def audit_views(deploy_dir: Path, views_dir: Path, model_dir: Path | None = None,
                progress: Progress = no_progress) -> AuditReport:
    """Attack the recorded views in ``views_dir`` of the deployment in ``deploy_dir``; score
    against what the owner reads with the real key (rows with ``source == "views"``)."""
    deploy = Manifest.load(Path(deploy_dir))
    key_path = _load_key(deploy)
    if deploy.encryption != EE_ENCODER:
        raise AuditError(f"{deploy.path}: --views audits only {EE_ENCODER} deployments so "
                         f"far, not {deploy.encryption}")
    views_dir = Path(views_dir)
    views = read_views(views_dir)
    attacked, others, foreign = split_views(views, deploy)
    if not attacked and not any(others.values()):
        found = sorted({str(v.shard) for v in views})
        raise AuditError(f"{views_dir}: no recorded views of this deployment's node shards "
                         f"({', '.join(s.cid for s in deploy.node_shards)}); shards found: "
                         f"{', '.join(found) if found else 'none (no views)'}")
    report = AuditReport(deploy.cid, deploy.encryption)
    report.views = {
        "dir": str(views_dir), "views": len(views),
        "attacked": {"shard": deploy.node_shards[0].cid, "views": len(attacked)},
        "not_attacked_yet": [{"shard": cid, "views": len(v),
                              "ops": dict(Counter(x.op for x in v))}
                             for cid, v in others.items() if v],
        "other_shards": foreign}
    if not attacked:
        progress(f"no views of the first node shard in {views_dir}: nothing attacked yet")
        return report
    with _plain_model(deploy, model_dir, progress) as plain:
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
    special = list(_special_ids(_client_file(deploy, "tokenizer")))

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

    _timed(report, progress, "exact weight matching", "hidden permutation", exact_key)
    _timed(report, progress, "exact weight matching", "input tokens", exact_tokens)
    _timed(report, progress, "keyless sort", "input tokens", keyless)


__all__ = ["audit_views", "split_views"]
