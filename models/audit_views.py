"""``veilnet audit DEPLOY --views DIR``: the audit's attacks run on exactly what a node recorded
with ``veilnet node start --record-received DIR`` (models/received.py), instead of on the
audit's own simulated traffic (models/audit.py; docs/threat-model.md, "Auditing a deployment").

For an ``ee-encoder/1`` deployment, every recorded request to the deployment's first node shard
(the one that receives the client head's first hidden state) is attacked as the suite attacks
its simulated traffic: keyless sorting, and decryption with the key recovered from the public
weights followed by nearest-embedding reading. The recorded texts are unknown, so the ground
truth is what the owner reads with the real key: ``client/key.json``'s hidden permutation undoes
the encryption and the nearest row of the plaintext model's embeddings (at each position) gives
the token id.

Every later node shard's recorded views are attacked by decrypt-then-probe (models/audit_probe.py:
un-permute with the recovered key, read with a ridge probe trained on public text's plaintext
hidden state of the same name). Their ground truth is the text of the first-shard view they
continue: the owner decrypts each first-shard view with the real key, runs the plaintext node
shards on it in-process, and links a later view when its decryption equals that plaintext
hidden state. A later view no first-shard view explains is listed as not scored.

``masked/1`` recordings go to models/audit_views_masked.py, ``ee-decoder/1`` ones to
models/audit_views_decoder.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from crypto.ee_key import EEKey
from models import audit_attacks as aa
from models.audit_probe import PublicStates, hidden_input
from models.audit_report import (
    MAX_TOKENS,
    AuditError,
    AuditReport,
    client_file,
    heldout_sentences,
    load_key,
    most_common_rate,
    no_views_error,
    plain_model,
    special_ids,
    timed,
)
from models.audit_views_decoder import audit_decoder_views
from models.audit_views_masked import audit_masked_views
from models.ee_attack import recover_key
from models.ee_plan import plan_encryption
from models.importer import Progress, no_progress
from models.manifest import EE_DECODER, EE_ENCODER, MASKED, Manifest, ShardSpec
from models.pipeline import Pipeline
from models.received import RecordedView, read_views
from models.tokenizer import TextTokenizer

HIDDEN, BIAS = "hidden_0", "attention_bias"  # what the first node shard of ee-encoder/1 receives
PUBLIC_PROBE = 200  # public sentences (seed 16) a later shard's probe is trained on


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


def _received(view: RecordedView, width: int, name: str = HIDDEN,
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(hidden [batch, seq, d], attention bias [batch, 1, 1, seq])`` of one recorded request
    to an encoder node shard whose hidden input is ``name``."""
    names = {i.name for i in view.inputs}
    if not {name, BIAS} <= names:
        raise AuditError(f"{view.root}: request {view.request_id} has inputs {sorted(names)}, "
                         f"not {name} and {BIAS}")
    got = view.load()
    hidden, bias = np.asarray(got[name]), np.asarray(got[BIAS])
    if hidden.ndim != 3 or hidden.shape[-1] != width or bias.ndim != 4 \
            or bias.shape[0] != hidden.shape[0] or bias.shape[-1] != hidden.shape[1]:
        raise AuditError(f"{view.root}: request {view.request_id}: {name} {hidden.shape} "
                         f"and {BIAS} {bias.shape} are not a [batch, seq, {width}] state and "
                         "its [batch, 1, 1, seq] mask")
    return hidden, bias


def _visible(bias: np.ndarray) -> np.ndarray:
    return bias[:, 0, 0, :] >= 0  # padding is what the node sees masked


def audit_views(deploy_dir: Path, views_dir: Path | Sequence[Path], model_dir: Path | None = None,
                progress: Progress = no_progress) -> AuditReport:
    """Attack the recorded views in ``views_dir`` (one directory, or one per node) of the
    deployment in ``deploy_dir``; score against what the owner reads with its secret: the real
    key (``ee-encoder/1``, ``ee-decoder/1``) or the masks the other node drew (``masked/1``);
    rows with ``source == "views"``."""
    deploy = Manifest.load(Path(deploy_dir))
    dirs = [Path(views_dir)] if isinstance(views_dir, str | Path) else [Path(d) for d in views_dir]
    if not dirs:
        raise AuditError("--views: no directory given")
    if deploy.encryption == MASKED:
        report = audit_masked_views(deploy, dirs, model_dir, progress)
    elif deploy.encryption == EE_DECODER:
        report = audit_decoder_views(deploy, dirs, model_dir, progress)
    elif deploy.encryption == EE_ENCODER:
        report = _audit_encoder(deploy, dirs, model_dir, progress)
    else:
        raise AuditError(f"{deploy.path}: --views audits {EE_ENCODER}, {EE_DECODER} and "
                         f"{MASKED} deployments, not {deploy.encryption}")
    for row in report.rows:
        row.source = "views"
    return report


def _audit_encoder(deploy: Manifest, dirs: list[Path], model_dir: Path | None,
                   progress: Progress) -> AuditReport:
    key_path = load_key(deploy)
    views = [v for d in dirs for v in read_views(d)]
    firsts, others, foreign = split_views(views, deploy)
    if not firsts and not any(others.values()):
        raise no_views_error(dirs, deploy, (str(v.shard) for v in views))
    report = AuditReport(deploy.cid, deploy.encryption)
    report.views = {
        "dir": str(dirs[0]) if len(dirs) == 1 else [str(d) for d in dirs], "views": len(views),
        "shards": [{"shard": s.cid, "index": s.index,
                    "views": len(firsts if s == deploy.node_shards[0] else others[s.cid])}
                   for s in deploy.node_shards],
        "other_shards": foreign, "unscored": []}
    if not firsts:
        report.views["unscored"].append(
            f"{sum(map(len, others.values()))} views of later node shards: the ground truth "
            "follows each text from the first node shard, and no view of it was recorded "
            "(pass that node's recording with --views too)")
        return report
    with plain_model(deploy, model_dir, progress) as plain:
        _attack(report, deploy, plain, key_path, firsts, others, progress)
    return report


def _attack(report: AuditReport, deploy: Manifest, plain: Manifest, key_path: Path,
            views: list[RecordedView], later: dict[str, list[RecordedView]],
            progress: Progress) -> None:
    key = EEKey.load(key_path)
    hidden_true = key.perm("hidden").perm
    emb = aa.EncoderEmbeddings.from_head(onnx.load(str(plain.shard_path(plain.head))))
    sent = [_received(v, len(hidden_true)) for v in views]
    received = [(h, _visible(b)) for h, b in sent]
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
    if any(later.values()):
        _probe_later(report, deploy, plain, hidden_true, recovered["hidden"],
                     [(aa.apply_perm(h, hidden_true), b) for h, b in sent],
                     truths, counted, special, later, progress)


def _probe_later(report: AuditReport, deploy: Manifest, plain: Manifest, hidden_true: np.ndarray,
                 perm: np.ndarray, firsts: list[tuple[np.ndarray, np.ndarray]],
                 truths: list[np.ndarray], counted: list[np.ndarray], special: list[int],
                 later: dict[str, list[RecordedView]], progress: Progress) -> None:
    """Decrypt-then-probe on every later node shard's views, each scored against the text of
    the first-shard view it continues (found by running the plaintext node shards on the
    owner's decryption of each first-shard view)."""
    unscored = report.views["unscored"] if report.views else []
    if [s.index for s in plain.node_shards] != [s.index for s in deploy.node_shards]:
        unscored.append(f"{sum(map(len, later.values()))} views of later node shards: the "
                        "plaintext model given is split differently from the deployment")
        return
    progress("following each recorded text through the plaintext node shards")
    run = Pipeline(plain, spin=False)
    chains: list[dict[str, np.ndarray]] = []  # per first-shard view: every tensor by name
    for hidden, bias in firsts:
        names = {hidden_input(plain.node_shards[0]): hidden.astype(np.float32), BIAS: bias}
        for shard in plain.node_shards[:-1]:
            names.update(run.run_local(shard, {t.name: names[t.name] for t in shard.inputs}))
        chains.append(names)
    pub: PublicStates | None = None  # public text's plaintext states, once a view is linked
    rng = np.random.default_rng(16)
    for enc, pl in zip(deploy.node_shards[1:], plain.node_shards[1:], strict=True):
        views = later.get(enc.cid, [])
        if not views:
            continue
        name = hidden_input(enc)
        seen, read_rows, linked = [], [], 0
        for view in views:
            hidden, _ = _received(view, len(hidden_true), name)
            owner = aa.apply_perm(hidden, hidden_true)
            match = next((k for k, chain in enumerate(chains) if chain[name].shape == owner.shape
                          and _same(chain[name], owner)), None)
            if match is None:
                continue
            linked += 1
            seen.append(aa.apply_perm(hidden, perm)[counted[match]].astype(np.float64))
            read_rows.append(truths[match][counted[match]])
        if len(views) > linked:
            unscored.append(f"{len(views) - linked} of {len(views)} views of node shard "
                            f"{enc.index} ({name}) continue no recorded first-shard view")
        if not linked:
            continue
        truth = np.concatenate(read_rows)
        if pub is None:
            pub = PublicStates.of(plain, TextTokenizer(client_file(deploy, "tokenizer"),
                                                       MAX_TOKENS),
                                  heldout_sentences(PUBLIC_PROBE, seed=16), special)

        def probe(pub: PublicStates = pub, pl: ShardSpec = pl, name: str = name,
                  rows: list[np.ndarray] = seen, truth: np.ndarray = truth, linked: int = linked,
                  ) -> tuple[float, float, dict[str, Any]]:
            model = pub.probe(pl.index, rng)
            read = model.predict(np.concatenate(rows))
            return float(np.mean(read == truth)), most_common_rate(truth), {
                "tokens": int(truth.size), "requests": linked, "shard": pl.index,
                "input": name, "train_sentences": PUBLIC_PROBE, "classes": len(model.classes),
                "coverage": float(np.mean(np.isin(truth, model.classes))),
                "ground_truth": "the linked first-shard view's tokens (decrypted with "
                                "client/key.json, followed through the plaintext node shards)",
                "note": f"the node un-permutes its {name} with the recovered key and reads it "
                        "with a ridge probe trained on public text's plaintext " + name}

        timed(report, progress, f"decrypt-then-probe [{name}]", "input tokens", probe)


def _same(expected: np.ndarray, got: np.ndarray) -> bool:
    """The owner's decryption of a later view equals the plaintext hidden state computed from
    a first-shard view (float32 through different weights: equal to about 1e-5 of the scale)."""
    scale = max(1.0, float(np.abs(expected).max()))
    return float(np.abs(expected - got).max()) <= 1e-3 * scale


__all__ = ["audit_views", "split_views"]
