"""``veilnet audit DEPLOY --views DIR ...`` for a ``masked/1`` deployment (``--views`` once per
node; models/audit_views.py dispatches here): each node's recorded layer-0 ``qkv`` views are
attacked alone (nearest embedding, ML and MAP, and a linear probe), and every pair of nodes
pooled (collusion: ``x + r`` minus ``r``). The owner's secret is the mask, which only the other
node of each call drew, so the ground truth is ``x = (x + r) - r`` over every directory given,
read by nearest embedding.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import onnx
from tokenizers import Tokenizer

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
    most_common_rate,
    plain_model,
    special_ids,
    timed,
)
from models.importer import Progress
from models.manifest import Manifest, ShardSpec
from models.masked import MaskedPlan
from models.received import RecordedView, read_views

PUBLIC = 64  # public sentences (seed 16) the probe and prior are trained on


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


def audit_masked_views(deploy: Manifest, dirs: list[Path], model_dir: Path | None,
                       progress: Progress) -> AuditReport:
    """One node's recorded views attacked alone (nearest embedding, ML and MAP, and the linear
    probe on the layer-0 ``qkv`` input, whether it held ``x + r`` or the mask ``r``; a linear
    probe on every later shard's views, ``_later_shards``), and each pair of nodes pooled
    (collusion). Ground truth: the owner's reading of ``x = (x + r) - r``
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
    tokenizer = Tokenizer.from_file(str(tok_path))
    cls_id, pad_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[PAD]") or 0
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
    _later_shards(report, deploy, plan, pairs, [(pos, t, c) for (_, _, _, pos), t, c in zip(
        calls, truths, counted, strict=True)], pad_id, dirs, progress)
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


def _later_shards(report: AuditReport, deploy: Manifest, plan: MaskedPlan,
                  pairs: list[tuple[_Seen, _Seen]],
                  calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]], pad_id: int,
                  dirs: list[Path], progress: Progress) -> None:
    """Each node's recorded views of every later node shard (``x + r`` or ``r``), read by a
    linear probe trained on public text's simulated views of that shard at its sigma; one row
    per node, its best shard (the per-shard rates in its detail).

    Ground truth: the owner follows each layer-0 call ``(positions, tokens, counted)`` through the
    deployment in process (the tokens read from ``x`` rebuild the padded request: ``[PAD]`` rows
    are padding) and links a later call when its ``(x + r) - r`` equals the followed input of
    that shard; the linked call's tokens are the truth of both its views."""
    unscored = report.views["unscored"] if report.views else []
    first = first_qkv(deploy)
    later = [(a, m) for a, m in pairs if a.shard.cid != first.cid]
    if not later:
        return
    progress("following each recorded layer-0 call through the deployment")
    sim = Simulator(deploy, deploy.node_shards)
    names = [t.name for t in deploy.inputs]
    followed = []
    for pos, tokens, _ in calls:
        ids = tokens.reshape(-1, int(pos.max()) + 1).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": (ids != pad_id).astype(np.int64),
                 "token_type_ids": np.zeros_like(ids)}
        followed.append(sim.follow({n: feeds[n] for n in names}))
    linked: dict[str, list[tuple[_Seen, int]]] = defaultdict(list)  # shard cid -> (view, call)
    missed = 0
    for a, m in later:
        x = a.data - m.data
        k = next((k for k, f in enumerate(followed) if f[a.shard.cid].shape == x.shape
                  and float(np.abs(f[a.shard.cid] - x).max())
                  <= 1e-6 * max(1.0, float(np.abs(x).max()))), None)
        if k is None:
            missed += 1
            continue
        linked[a.shard.cid] += [(a, k), (m, k)]
    if missed:
        unscored.append(f"{missed} of {len(later)} paired later-shard calls continue no "
                        "recorded layer-0 call")
    if not linked:
        return
    progress(f"training a probe for each of {len(linked)} later shards on public text")
    public = sim(heldout_sentences(PUBLIC, seed=16))  # the same simulator: weights loaded once
    rng = np.random.default_rng(17)
    by_cid = {s.cid: s for s in deploy.node_shards}
    rates: dict[int, dict[str, dict[str, float]]] = defaultdict(dict)
    for cid, views in linked.items():
        sigma = plan.shards[cid].sigma
        probe = RidgeProbe(public.x[cid] + rng.normal(0.0, sigma, public.x[cid].shape),
                           public.ids, rng)
        for node in range(len(dirs)):
            mine = [(v, k) for v, k in views if v.node == node]
            if not mine:
                continue
            read = probe.predict(np.concatenate([v.data[calls[k][2]] for v, k in mine]))
            truth = np.concatenate([calls[k][1][calls[k][2]] for _, k in mine])
            rates[node][shard_name(by_cid[cid])] = {
                "success": float(np.mean(read == truth)), "tokens": int(truth.size),
                "baseline": most_common_rate(truth)}
    for node, per_shard in sorted(rates.items()):
        best = max(per_shard, key=lambda n: per_shard[n]["success"] - per_shard[n]["baseline"])
        row = per_shard[best]
        timed(report, progress, f"linear probe, later shards [views {node + 1}]",
              "input tokens", lambda row=row, best=best, per_shard=per_shard, node=node: (
                  row["success"], row["baseline"], {
                      "dir": str(dirs[node]), "best_shard": best, "tokens": row["tokens"],
                      "shards": per_shard, "scope": "one node, its recorded views",
                      "note": "ridge per shard, trained on public text's simulated views at "
                              "that shard's sigma; the best of the shards (the most over its "
                              "baseline), so the row is biased up by choosing among them"}))


__all__ = ["audit_masked_views", "fit_bucket", "pair_views"]
