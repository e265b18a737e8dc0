"""``veilnet audit`` on a masked/1 deployment (models/audit_masked.py, models/audit_views.py):
a node alone reads no more than the best constant guess, and the same attack code reads every
token once the mask is tiny, repeated often enough, or cancelled by a colluding pair (so the
masking, not a broken attack, is what stops it). Small samples keep the runtime down; the
figures of the default 200 sentences are in docs/threat-model.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from tokenizers import Tokenizer

import models.audit
from crypto.masks import expand_mask
from models import Manifest, ShardSession, TextTokenizer, pad_to_bucket
from models import audit_attacks as aa
from models.audit import MAX_TOKENS, AuditError, AuditReport, audit_deployment, heldout_sentences
from models.audit_masked import COLLUSION, Candidates, audit_masked, best_single_node, first_qkv
from models.audit_views import audit_views
from models.audit_views_masked import fit_bucket
from models.manifest import ShardSpec
from models.masked import MaskedPlan, node_weight
from models.pipeline import Pipeline
from node.cli import main

SAMPLE, TRAIN = 12, 32
QUERIES = (1, 100, 10**8)
ONE = "one node, one query"


@pytest.fixture(scope="module")
def manifests(masked_deployment: Path, minilm_dir: Path) -> tuple[Manifest, Manifest]:
    return Manifest.load(masked_deployment), Manifest.load(minilm_dir)


@pytest.fixture(scope="module")
def masked_report(manifests: tuple[Manifest, Manifest]) -> AuditReport:
    report = audit_masked(*manifests, heldout_sentences(SAMPLE), queries=QUERIES, train=TRAIN)
    print(report.table())
    return report


@pytest.fixture(scope="module")
def unmasked_report(manifests: tuple[Manifest, Manifest]) -> AuditReport:
    """The same attacks with every mask's sigma forced to 1e-3 (test only)."""
    report = audit_masked(*manifests, heldout_sentences(SAMPLE), sigma=1e-3, queries=(1,),
                          train=TRAIN, layers=(0,))
    print(report.table())
    return report


def test_one_node_reads_no_more_than_the_constant_guess(masked_report: AuditReport) -> None:
    single = [r for r in masked_report.rows if r.detail.get("scope") == ONE]
    # nearest (ML, MAP), norms, 8 probes (4 kinds x first and last layer), averaging k=1
    assert len(single) == 12
    for row in single:
        assert row.detail["tokens"] >= 300  # measured 410 tokens of 12 sentences
        assert row.success <= row.baseline + 0.01, row  # measured: MAP and probes = baseline
    assert best_single_node(masked_report) <= single[0].baseline + 0.01
    probed = {r.detail["shard"] for r in single if r.attack.startswith("linear probe")}
    assert probed == {f"masked/{layer}/{kind}/in" for layer in (0, 5)
                      for kind in ("qkv", "o", "up", "down")}


def test_the_same_attacks_read_the_tokens_without_the_mask(unmasked_report: AuditReport,
                                                           masked_report: AuditReport) -> None:
    for attack in ("nearest embedding (ML)", "nearest embedding (MAP)", "averaging 1 queries"):
        assert unmasked_report.row(attack, "input tokens").success > 0.9  # measured 1.0
    # the probe, trained on 32 sentences, reads what it has seen (measured 0.68 vs 0.11)
    probe = unmasked_report.row("linear probe masked/0/qkv/in", "input tokens")
    assert probe.success > probe.baseline + 0.3
    assert masked_report.row("nearest embedding (ML)", "input tokens").success < 0.05


def test_averaging_repeated_queries_erodes_the_bound(masked_report: AuditReport,
                                                     manifests: tuple[Manifest, Manifest],
                                                     ) -> None:
    deploy = manifests[0]
    plan = MaskedPlan.of(deploy)
    mask = plan.shards[first_qkv(deploy).cid]
    per_view = mask.input_norm_bound ** 2 / (2 * mask.sigma ** 2 * np.log(2))
    for k in QUERIES:
        row = masked_report.row(f"averaging {k} queries", "input tokens")
        assert row.detail["bound_bits_this_view"] == pytest.approx(k * per_view)
        assert row.detail["bound_bits_all_views"] == pytest.approx(k * 1e-4)
        assert row.detail["effective_sigma"] == pytest.approx(mask.sigma / np.sqrt(k))
    assert masked_report.row("averaging 100 queries", "input tokens").success <= \
        masked_report.row("averaging 100 queries", "input tokens").baseline + 0.01
    # 1e8 queries of one text: 417 bits of bound on that view, and every token is read
    assert masked_report.row(f"averaging {10**8} queries", "input tokens").success > 0.9


def test_collusion_weight_matching_length_and_bound(masked_report: AuditReport) -> None:
    assert masked_report.row(COLLUSION, "input tokens").success == 1.0  # measured 1.0
    key = masked_report.row("weight matching", "key")
    assert key.detail["applicable"] is False and "not applicable" in key.detail["note"]
    length = masked_report.row("length and padding", "sequence length")
    assert length.detail["mask_sent"] is False
    assert length.detail["first_node_inputs"] == ["masked/0/qkv/in"]
    assert set(length.detail["buckets_seen"]) <= {16, 32, 64}
    assert all(r.detail.get("note") for r in masked_report.rows)
    doc = json.loads(json.dumps(masked_report.to_json()))
    assert doc["scheme"] == "masked/1"
    assert doc["bound"]["bits_per_token_per_query"] == 1e-4
    assert doc["bound"]["sum_over_views_bits"] == pytest.approx(1e-4)
    table = masked_report.table()
    assert "information bound: at most 0.0001 bits per token per query" in table
    assert "weight matching: key: not applicable" in table


def test_factored_candidates_match_the_embedding_block(minilm_dir: Path) -> None:
    manifest = Manifest.load(minilm_dir)
    emb = aa.EncoderEmbeddings.from_head(onnx.load(str(manifest.shard_path(manifest.head))))
    positions = np.array([0, 3, 3, 40])
    cands = Candidates(emb, positions)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((4, 384)) * 3
    dist = cands.dist(rows, cands.rows_of(positions))
    for i, t in enumerate(positions):
        c = emb.at(int(t)).astype(np.float64)
        want = np.sum(c * c, axis=1) - 2 * c @ rows[i]
        assert np.abs(dist[i] - want).max() < 1e-3 * np.abs(want).max()


def test_cli_audits_a_masked_deployment(masked_deployment: Path, minilm_dir: Path,
                                        masked_report: AuditReport,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def fake(deploy: Manifest, plain: Manifest, texts: list[str], seed: int,
             progress: object) -> AuditReport:
        calls.append((deploy.encryption, plain.cid, len(texts), seed))
        return masked_report

    monkeypatch.setattr(models.audit, "audit_masked", fake)
    assert main(["audit", str(masked_deployment), "--model", str(minilm_dir), "--sample", "3",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert calls == [("masked/1", Manifest.load(minilm_dir).cid, 3, 15)]
    assert doc["scheme"] == "masked/1" and doc["bound"]["views_per_row"] == 24
    assert {r["attack"] for r in doc["rows"]} >= {"weight matching", COLLUSION,
                                                  "nearest embedding (ML)"}
    assert main(["audit", str(masked_deployment), "--model", str(minilm_dir)]) == 0
    assert "information bound" in capsys.readouterr().out
    with pytest.raises(AuditError, match="at least 1"):
        audit_deployment(masked_deployment, minilm_dir, sample=0)


# --- recorded views (models/audit_views.py) -------------------------------------------------------

def _record(root: Path, request_id: str, op: str, shard: str, name: str,
            array: np.ndarray) -> None:
    """One request as node/recorder.py writes it."""
    (root / request_id).mkdir(parents=True)
    np.save(root / request_id / "in.npy", array, allow_pickle=False)
    line = {"format": "veilnet-received/1", "time": 1764698000.0,
            "protocol": "/veilnet/infer/1", "op": op, "request_id": request_id, "shard": shard,
            "session": None, "peer": "12D3KooWtest",
            "inputs": [{"name": name, "file": f"{request_id}/in.npy", "dtype": "float64",
                        "shape": list(array.shape)}]}
    with (root / "index.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")


def node_inputs(deploy: Manifest, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every node shard's input (by CID) for ``inputs``, the node products done here."""
    seen: dict[str, np.ndarray] = {}

    def node(shard: ShardSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen[shard.cid] = feeds[shard.inputs[0].name]
        return {shard.outputs[0].name: seen[shard.cid] @ node_weight(deploy, shard)}

    Pipeline(deploy, node_runner=node, spin=False).run(inputs)
    return seen


def test_recorded_views_alone_and_pooled(masked_deployment: Path, minilm_dir: Path,
                                         tmp_path: Path) -> None:
    deploy = Manifest.load(masked_deployment)
    first = first_qkv(deploy)
    sigma = MaskedPlan.of(deploy).shards[first.cid].sigma
    name = first.inputs[0].name
    tok_path = masked_deployment / "client" / "tokenizer.json"
    head = ShardSession(deploy.shard_path(deploy.head), deploy.head, spin=False)
    a, b = tmp_path / "a", tmp_path / "b"
    texts = [["A man is eating food.", "Two nodes that collude read everything."],
             ["One node alone reads nothing."]]
    for n, batch in enumerate(texts):
        inputs = pad_to_bucket(deploy, TextTokenizer(tok_path, MAX_TOKENS)(batch))
        x = head.run(inputs)[name]
        seed = bytes([n]) * 32
        r = expand_mask(seed, x.shape, sigma)
        _record(a, f"x{n}", "infer", first.cid, name, x + r)
        _record(b, f"r{n}", "infer-mask-seed", first.cid, name, r)
        # a mask of another call of the same shape: the row-norm check must not pair it
        _record(b, f"other{n}", "infer-mask-seed", first.cid, name,
                expand_mask(bytes([n + 9]) * 32, x.shape, sigma))
        if n == 0:
            assert fit_bucket(x, (16, 32, 64), x[0]) == 16
            # the same call's layer-1 qkv input, computed here by running the deployment with
            # the node products done in this test (x @ W), recorded as a pair on the two nodes
            later = next(s for s in deploy.node_shards if s.inputs[0].name.startswith(
                "masked/1/qkv"))
            y = node_inputs(deploy, inputs)[later.cid]
            r1 = expand_mask(bytes([7]) * 32, y.shape,
                             MaskedPlan.of(deploy).shards[later.cid].sigma)
            _record(a, "y0", "infer", later.cid, later.inputs[0].name, y + r1)
            _record(b, "s0", "infer-mask-seed", later.cid, later.inputs[0].name, r1)
    tok = Tokenizer.from_file(str(tok_path))
    real = sum(1 for batch in texts for t in batch for s in tok.encode(t).special_tokens_mask
               if not s)
    report = audit_views(masked_deployment, [a, b], minilm_dir)
    print(report.table())
    assert report.views is not None
    assert report.views["paired"] == 3 and report.views["unpaired"] == 2
    assert report.views["ground_truth"] == {"requests": 2, "tokens": real}
    assert {r.source for r in report.rows} == {"views"}
    for node in (1, 2):  # A's x + r, and B's r (independent of x)
        for attack in ("nearest embedding (ML)", "nearest embedding (MAP)",
                       f"linear probe {name}"):
            row = report.row(f"{attack} [views {node}]", "input tokens")
            assert row.detail["tokens"] == real
            # 25 tokens: a chance hit is 4 points; a reading would be near 100%
            assert row.success <= row.baseline + 0.05, row
    first_real = sum(1 for t in texts[0] for s in tok.encode(t).special_tokens_mask if not s)
    for node in (1, 2):  # the layer-1 call is linked to the first batch's layer-0 call
        row = report.row(f"linear probe, later shards [views {node}]", "input tokens")
        assert row.detail["tokens"] == first_real
        assert row.detail["best_shard"] == "masked/1/qkv/in"
        assert row.success <= row.baseline + 0.1, row  # 17 tokens: 2 chance hits allowed
    assert report.views["unscored"] == []
    pooled = report.row("collusion [views 1+2]", "input tokens")
    assert pooled.success == 1.0 and pooled.detail["tokens"] == real
    alone = audit_views(masked_deployment, [a], minilm_dir)
    assert alone.rows == [] and alone.views is not None and alone.views["unscored"]
    assert "not scored:" in alone.table()
