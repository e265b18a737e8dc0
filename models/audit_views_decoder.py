"""``veilnet audit DEPLOY --views DIR ...`` for an ``ee-decoder/1`` deployment (SmolLM2
generation; models/audit_views.py dispatches here): the attacks of models/audit.py's decoder
audit run on exactly the session views nodes recorded with ``--record-received`` (ops ``open``,
a prompt's rows, and ``step``, one token's row; models/received.py).

First node shard: every recorded row, read three ways: with the rotation recovered from the
public weights (exact weight matching), keyless by row norm, and keyless with a rotation fitted
on the recorded rows themselves (``rotation_from_traffic``). Ground truth: what the owner reads
with ``client/key.json`` (the shard's real rotation undone, nearest row of the plaintext
embedding table); special tokens are not counted.

Later node shards receive a state several layers deep: a node that recovered its rotation from
the weights de-rotates it and reads it with a ridge probe trained on public text (Python's help
texts, seed 16) run through the public plaintext model. The ground truth links each later view
to the first shard's view of the same text: the owner decrypts every first-shard session with
the real key and replays it (open, then each step in order) through the plaintext node shards
from an empty cache, which gives the plaintext input of every later shard at every position; a
later session is linked view by view (its ``open`` at positions ``0..n``, each ``step`` after)
while its views, decrypted with that shard's real rotation, equal the replay's. A view that
cannot be linked is listed under ``unscored``, never scored.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from tokenizers import Tokenizer

from models import ee_decoder_attack as dec
from models.audit_attacks import RidgeProbe
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
from models.decoding import DecoderLayout, LocalHop
from models.ee_decoder_key import DecoderDims, DecoderKey
from models.importer import Progress
from models.manifest import Manifest, ShardSpec
from models.pipeline import Pipeline
from models.received import RecordedView, read_views

PUBLIC, PUBLIC_SEED = 200, 16  # public sentences the probes train on (as models/audit.py)
LINK_TOLERANCE = 1e-3  # largest row-relative difference of a linked view (measured ~3e-6)
SESSION_OPS = ("open", "step")


@dataclass
class _Session:
    """One session's recorded views on one node shard, in the order the node received them."""

    shard: ShardSpec
    where: str  # "<dir>: session <id>"
    views: list[RecordedView] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)  # each view's [batch, n, d] float64

    def flat(self) -> np.ndarray:
        return np.concatenate([r.reshape(-1, r.shape[-1]) for r in self.rows])

    def replayable(self) -> bool:
        return self.views[0].op == "open" and all(r.shape[0] == 1 for r in self.rows)


@dataclass
class _Replay:
    """A first-shard session as the owner reads it: the token at each position and, per later
    node shard (deployment index), its plaintext input at the same positions."""

    tokens: np.ndarray
    inputs: dict[int, np.ndarray]


def _load(deploy: Manifest, layout: DecoderLayout, dirs: list[Path], width: int,
          ) -> tuple[dict[int, list[_Session]], dict[str, Any], list[str]]:
    """``(sessions by node shard index, counts for report.views, unscored reasons)``."""
    by_cid = {s.cid: s for s in deploy.node_shards}
    found: dict[int, list[_Session]] = {s.index: [] for s in deploy.node_shards}
    open_: dict[tuple[Path, str, str], _Session] = {}
    ops: Counter[tuple[int, str]] = Counter()
    total, shards_seen = 0, set()
    for root in dirs:
        for view in read_views(root):
            total += 1
            shards_seen.add(str(view.shard))
            shard = by_cid.get(view.shard or "")
            if shard is None:
                continue
            ops[shard.index, view.op] += 1
            if view.op not in SESSION_OPS:
                continue
            name = layout.hop_inputs(shard)[0].name
            got = view.load().get(name)
            if not isinstance(got, np.ndarray) or got.ndim != 3 or got.shape[-1] != width:
                raise AuditError(f"{root}: request {view.request_id} ({view.op}) to node shard "
                                 f"{shard.index} holds no [batch, seq, {width}] {name}")
            sid = view.session or view.request_id
            session = open_.get((root, shard.cid, sid))
            if session is None:
                session = open_[root, shard.cid, sid] = _Session(shard, f"{root}: session {sid}")
                found[shard.index].append(session)
            session.views.append(view)
            session.rows.append(np.asarray(got, np.float64))
    if not ops:
        raise no_views_error(dirs, deploy, shards_seen)
    counts = {"dirs": [str(d) for d in dirs], "views": total,
              "other_shards": total - sum(ops.values()),
              "shards": [{"shard": s.cid, "index": s.index,
                          "ops": {op: n for (i, op), n in sorted(ops.items()) if i == s.index}}
                         for s in deploy.node_shards if any(i == s.index for i, _ in ops)]}
    unscored = [f"{n} {op} views of node shard {i}: only session open/step views are attacked"
                for (i, op), n in sorted(ops.items()) if op not in SESSION_OPS]
    return found, counts, unscored


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    if got.shape != want.shape or not got.size:
        return False
    err = np.linalg.norm(got - want, axis=-1) / np.maximum(np.linalg.norm(want, axis=-1), 1e-30)
    return float(err.max()) <= LINK_TOLERANCE


def _chain(hops: list[tuple[int, str, LocalHop]], x: np.ndarray) -> dict[int, np.ndarray]:
    """Run plaintext node shards in order from their first's input ``x`` ``[1, n, d]``; each
    ``(later deployment index, input name, hop)`` gives that later shard's input ``[n, d]``."""
    out = {}
    for index, name, hop in hops:
        x = next(iter(hop({name: x.astype(np.float32)}).values()))
        out[index] = x[0].astype(np.float64)
    return out


def _link(session: _Session, rotation: np.ndarray, replays: list[_Replay],
          ) -> list[tuple[RecordedView, np.ndarray, np.ndarray]]:
    """``(view, rows received [n, d], true tokens [n])`` of the views of a later session linked
    to a replay: from its ``open`` on, while each view (de-rotated with the real key) equals
    the replay's input at the next positions of some replay still matching."""
    if not session.replayable():
        return []
    index, candidates, offset, linked = session.shard.index, replays, 0, []
    for view, rows in zip(session.views, session.rows, strict=True):
        plain, n = rows[0] @ rotation.T, rows.shape[1]
        candidates = [r for r in candidates if _close(plain, r.inputs[index][offset:offset + n])]
        if not candidates:
            break
        linked.append((view, rows[0], candidates[0].tokens[offset:offset + n]))
        offset += n
    return linked


def _public(plain: Manifest, pipe: Pipeline, layout: DecoderLayout, tok_path: Path,
            hops: list[tuple[int, str, ShardSpec]], special: set[int],
            ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Public sentences through the plaintext model, one per request (as a client sends a
    prompt): ``(token ids, each later shard's plaintext input at those tokens)``, specials
    left out."""
    tok = Tokenizer.from_file(str(tok_path))
    ids_all, rows = [], {i: [] for i, _, _ in hops}
    first_name = layout.hop_inputs(plain.node_shards[0])[0].name
    for text in heldout_sentences(PUBLIC, seed=PUBLIC_SEED):
        ids = np.array([tok.encode(text).ids[:MAX_TOKENS]], np.int64)
        x = pipe.run_local(plain.head, {"input_ids": ids})[first_name]
        keep = ~np.isin(ids[0], list(special))
        fresh = [(i, name, LocalHop(pipe, layout, s)) for i, name, s in hops]
        for i, got in _chain(fresh, x).items():
            rows[i].append(got[keep])
        ids_all.append(ids[0][keep])
    return np.concatenate(ids_all), {i: np.concatenate(r) for i, r in rows.items()}


def audit_decoder_views(deploy: Manifest, dirs: list[Path], model_dir: Path | None,
                        progress: Progress) -> AuditReport:
    """Attack the session views of ``deploy``'s node shards recorded in ``dirs``; score against
    the owner's reading with the real key (module docstring)."""
    key_path = load_key(deploy)
    key = DecoderKey.load(key_path)
    dims = DecoderDims.from_config(deploy.extra["config"])
    layout = DecoderLayout.of(deploy)
    found, counts, unscored = _load(deploy, layout, dirs, dims.d_model)
    report = AuditReport(deploy.cid, deploy.encryption)
    report.views = {**counts, "unscored": unscored}
    first, later = deploy.node_shards[0], deploy.node_shards[1:]
    if not found[first.index]:
        unscored += [f"{sum(len(s.views) for s in found[s.index])} views of node shard "
                     f"{s.index}: no view of the first node shard, whose reading the owner's "
                     "ground truth starts from" for s in later if found[s.index]]
        return report
    tok_path = client_file(deploy, "tokenizer")
    special = special_ids(tok_path)
    with plain_model(deploy, model_dir, progress) as plain:
        table = numpy_helper.to_array(onnx.load(str(plain.shard_path(plain.head)))
                                      .graph.initializer[0]).astype(np.float64)
        sessions = found[first.index]
        received = np.concatenate([s.flat() for s in sessions])
        truths = [dec.nearest_tokens(s.flat() @ key.shard(first.index).rotation.T, table)
                  for s in sessions]  # the owner's reading with the real key
        truth_all = np.concatenate(truths)
        counted = ~np.isin(truth_all, list(special))
        truth = truth_all[counted]
        base = most_common_rate(truth)
        common = {"tokens": int(truth.size), "rows": int(received.shape[0]),
                  "views": sum(len(s.views) for s in sessions), "sessions": len(sessions),
                  "ground_truth": "decrypted with client/key.json, nearest plaintext embedding"}
        report.views["attacked"] = {"shard": first.cid, "index": first.index,
                                    "views": common["views"], "tokens": common["tokens"]}

        def rate(read: np.ndarray) -> float:
            return float(np.mean(read[counted] == truth)) if truth.size else 0.0

        pairs = {e.index: p for e, p in zip(deploy.node_shards, plain.node_shards, strict=True)}
        rotations: dict[int, np.ndarray] = {}

        def exact_rotation() -> tuple[float, float, dict[str, Any]]:
            scores = {}
            for e in deploy.node_shards:
                if found[e.index]:
                    pw = dec.weights_of(onnx.load(str(plain.shard_path(pairs[e.index]))))
                    ew = dec.weights_of(onnx.load(str(deploy.shard_path(e))))
                    layer = min(int(n.split(".")[1]) for n in pw)
                    got = dec.recover_shard_key(pw, ew, [layer], dims)  # Q from layer `layer`
                    rotations[e.index] = got.rotation
                    s = dec.score_shard(got, key, e.index)  # the key only scores
                    scores[str(e.index)] = {k: s[k] for k in ("rotation", "rotation_rel_error",
                                                              "seconds")}
            return float(np.mean([s["rotation"] for s in scores.values()])), 0.0, {
                "shards": scores, "note": "each node shard with recorded views: its rotation "
                                          "from its encrypted weights and the public ones"}

        def traffic() -> tuple[float, float, dict[str, Any]]:
            fit = dec.rotation_from_traffic(received, table)
            true = key.shard(first.index).rotation
            return rate(dec.nearest_tokens(received @ fit.T, table)), base, {
                **common, "distinct_rows": len(np.unique(received, axis=0)),
                "rotation_rel_error": float(np.linalg.norm(fit - true) / np.linalg.norm(true)),
                "note": f"Procrustes fit on the recorded rows (exact once they span all "
                        f"{dims.d_model} dimensions)"}

        timed(report, progress, "exact weight matching", "rotation", exact_rotation)
        timed(report, progress, "exact weight matching", "input tokens", lambda: (
            rate(dec.nearest_tokens(received @ rotations[first.index].T, table)), base, common))
        timed(report, progress, "keyless norms", "input tokens", lambda: (
            rate(dec.tokens_by_norm(received, table)), base,
            {**common, "method": "row norm of the received rows"}))
        timed(report, progress, "keyless traffic rotation", "input tokens", traffic)
        if any(found[s.index] for s in later):
            _probe_later(report, deploy, layout, plain, key, found, truths, rotations,
                         special, tok_path, unscored, progress)
    return report


def _probe_later(report: AuditReport, deploy: Manifest, deploy_layout: DecoderLayout,
                 plain: Manifest, key: DecoderKey,
                 found: dict[int, list[_Session]], truths: list[np.ndarray],
                 rotations: dict[int, np.ndarray], special: set[int], tok_path: Path,
                 unscored: list[str], progress: Progress) -> None:
    """Decrypt-then-probe at each later node shard with views, scored on the views linked to
    a replay of the first shard's sessions."""
    first = deploy.node_shards[0]
    last = max(i for i, s in enumerate(deploy.node_shards) if found[s.index])
    pipe = Pipeline(plain, spin=False)
    layout = DecoderLayout.of(plain)
    # (later deployment index, plaintext input name of the shard before it, that shard)
    hops = [(e.index, layout.hop_inputs(p)[0].name, p) for e, p in
            zip(deploy.node_shards[1:last + 1], plain.node_shards[:last], strict=True)]
    progress("replaying the first node shard's sessions through the plaintext model")
    replays, rot1 = [], key.shard(first.index).rotation
    for session, tokens in zip(found[first.index], truths, strict=True):
        if not session.replayable():
            unscored.append(f"{session.where} on the first node shard: not replayed (no open "
                            "view recorded first, or a batch of several sequences)")
            continue
        mine = [(i, name, LocalHop(pipe, layout, s)) for i, name, s in hops]
        steps = [_chain(mine, r @ rot1.T) for r in session.rows]
        replays.append(_Replay(tokens, {i: np.concatenate([s[i] for s in steps])
                                        for i, _, _ in hops}))
    scored: list[dict[str, Any]] = []
    report.views["linked"] = scored
    links: dict[int, list[tuple[RecordedView, np.ndarray, np.ndarray]]] = {}
    for e in deploy.node_shards[1:last + 1]:
        linked, views = [], 0
        for session in found[e.index]:
            got = _link(session, key.shard(e.index).rotation, replays)
            linked += got
            views += len(session.views)
            if len(got) < len(session.views):
                why = "to a recorded first-shard view of the same text" \
                    if session.replayable() else "(no open view recorded first, or a batch of " \
                                                 "several sequences)"
                unscored.append(f"{len(session.views) - len(got)} of the {len(session.views)} "
                                f"views of {session.where} on node shard {e.index}: not linked "
                                + why)
        if views:
            scored.append({"shard": e.cid, "index": e.index, "views": views,
                           "linked": len(linked)})
        if linked:
            links[e.index] = linked
    if not links:
        return
    progress(f"running the plaintext model on {PUBLIC} public sentences for the probes")
    pub_ids, pub_rows = _public(plain, pipe, layout, tok_path, hops, special)
    by_index = {s.index: s for s in deploy.node_shards}
    for index, linked in links.items():
        e = by_index[index]
        rows = np.concatenate([r for _, r, _ in linked])
        truth_all = np.concatenate([t for _, _, t in linked])
        keep = ~np.isin(truth_all, list(special))
        truth = truth_all[keep]
        name = deploy_layout.hop_inputs(e)[0].name

        def run(e: ShardSpec = e, rows: np.ndarray = rows[keep], truth: np.ndarray = truth,
                linked: list[tuple[RecordedView, np.ndarray, np.ndarray]] = linked,
                name: str = name) -> tuple[float, float, dict[str, Any]]:
            probe = RidgeProbe(pub_rows[e.index], pub_ids, np.random.default_rng(PUBLIC_SEED))
            read = probe.predict(rows @ rotations[e.index].T)
            return float(np.mean(read == truth)) if truth.size else 0.0, \
                most_common_rate(truth), {
                    "tokens": int(truth.size), "shard": e.index, "input": name,
                    "views": dict(Counter(v.op for v, _, _ in linked)),
                    "train_sentences": PUBLIC, "train_rows": len(pub_ids),
                    "classes": len(probe.classes),
                    "coverage": float(np.mean(np.isin(truth, probe.classes))),
                    "ground_truth": "linked to the owner's replay of the first shard's view",
                    "note": f"the node de-rotates its {name} with the rotation recovered from "
                            "the weights and reads it with a ridge probe trained on public "
                            "text's plaintext input of this shard"}

        timed(report, progress, f"decrypt-then-probe [{name}]", "input tokens", run)


__all__ = ["LINK_TOLERANCE", "PUBLIC", "audit_decoder_views"]
