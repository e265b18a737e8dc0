"""``veilnet audit`` (models/audit.py, node/cli_audit.py): the attacks of docs/threat-model.md
run as a node would and scored with the real key. The bounds leave a margin under the figures
measured on the session's MiniLM and SmolLM2 deployments (docs/threat-model.md, "Auditing a
deployment"); small samples keep the runtime down."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from recorded_views import write_view
from tokenizers import Tokenizer

import models.audit
from models import Manifest
from models.audit import (
    MAX_TOKENS,
    AuditError,
    AuditReport,
    audit_deployment,
    heldout_sentences,
)
from models.audit_attacks import assign, match_rows, perturb_dense, perturb_low_rank
from node.cli import main

SAMPLE = 24


@pytest.fixture(scope="module")
def encoder_report(deployment_dir: Path, minilm_dir: Path) -> AuditReport:
    report = audit_deployment(deployment_dir, minilm_dir, sample=SAMPLE, noise=(0.5,))
    print(report.table())
    return report


def test_heldout_sample_is_deterministic_and_from_the_stdlib() -> None:
    a, b = heldout_sentences(50, seed=3), heldout_sentences(50, seed=3)
    assert a == b and len(set(a)) == 50
    assert heldout_sentences(50, seed=4) != a
    assert all(30 <= len(s) <= 300 for s in a)


def test_exact_weight_matching_reads_every_token(encoder_report: AuditReport) -> None:
    key = encoder_report.row("exact weight matching", "key")
    assert key.success == 1.0  # measured 1.0: every permutation entry of the key
    assert key.baseline < 0.01
    tokens = encoder_report.row("exact weight matching", "input tokens")
    assert tokens.success >= 0.99  # measured 1.0
    assert tokens.detail["tokens"] > 200


def test_baseline_is_the_most_common_token_of_the_sample(deployment_dir: Path,
                                                         encoder_report: AuditReport) -> None:
    tok = Tokenizer.from_file(str(deployment_dir / "client" / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=MAX_TOKENS)
    ids = [i for text in heldout_sentences(SAMPLE) for i, special in
           zip(tok.encode(text).ids, tok.encode(text).special_tokens_mask, strict=True)
           if not special]
    expected = Counter(ids).most_common(1)[0][1] / len(ids)
    for row in encoder_report.rows:
        if row.target == "input tokens":
            assert row.baseline == pytest.approx(expected, abs=1e-12)
            assert row.detail["tokens"] == len(ids)


def test_keyless_sort_reads_the_tokens(encoder_report: AuditReport) -> None:
    row = encoder_report.row("keyless sort", "input tokens")
    assert row.success >= 0.95  # measured 1.0 (24 and 200 sentences)


def test_nearest_neighbour_matching_survives_a_fine_tune(encoder_report: AuditReport) -> None:
    perm = encoder_report.row("robust matching, dense d=0.5", "hidden permutation")
    assert perm.success >= 0.95  # measured 1.0
    assert perm.detail["ffn_perms_mean"] >= 0.95  # measured 1.0
    tokens = encoder_report.row("robust matching, dense d=0.5", "input tokens")
    assert tokens.success >= 0.85  # measured 0.96 (the attacker's embeddings are noisy too)
    lora = encoder_report.row("robust matching, rank-8 delta", "hidden permutation")
    assert lora.success == 1.0  # LayerNorms are bit-identical under a low-rank delta
    assert encoder_report.row("robust matching, rank-8 delta", "input tokens").success >= 0.99


def test_decrypt_then_probe_reads_every_node_shards_input(encoder_report: AuditReport,
                                                          deployment_dir: Path) -> None:
    """Both node shards' inputs (hidden_0, and hidden_3 three layers deep) are read by a
    node that un-permutes them with the recovered key and probes them."""
    cuts = [t.name for s in Manifest.load(deployment_dir).node_shards for t in s.inputs
            if t.name.startswith("hidden_")]
    for cut in cuts:
        row = encoder_report.row(f"decrypt-then-probe [{cut}]", "input tokens")
        print(f"{cut}: {row.success:.3f} (baseline {row.baseline:.3f}, coverage "
              f"{row.detail['coverage']:.3f})")
        assert row.success > 5 * row.baseline and row.success <= row.detail["coverage"]


def test_length_and_padding_are_visible(encoder_report: AuditReport) -> None:
    row = encoder_report.row("length and padding", "sequence length")
    assert row.success == 1.0
    assert row.detail["mask_sent"] is True and "attention_bias" in row.detail[
        "first_node_inputs"]
    assert 0 < row.baseline < 1


def test_json_shape(encoder_report: AuditReport) -> None:
    doc = json.loads(json.dumps(encoder_report.to_json()))
    assert set(doc) == {"deployment", "scheme", "rows"}
    assert doc["scheme"] == "ee-encoder/1" and doc["deployment"].startswith("bafk")
    # key, tokens, 2 x (perm, tokens), keyless, decrypt-then-probe at both node shards, length
    assert len(doc["rows"]) == 10
    for row in doc["rows"]:
        assert set(row) == {"attack", "target", "success", "baseline", "detail", "seconds",
                            "source"}
        assert row["source"] == "simulated"
        assert 0.0 <= row["success"] <= 1.0 and 0.0 <= row["baseline"] <= 1.0
        assert isinstance(row["detail"], dict) and row["seconds"] >= 0


def test_cli_prints_table_and_json(deployment_dir: Path, encoder_report: AuditReport,
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def fake(deploy: Path, model: Path | None, **kwargs: object) -> AuditReport:
        calls.append((deploy, model, kwargs))
        return encoder_report

    monkeypatch.setattr(models.audit, "audit_deployment", fake)
    assert main(["audit", str(deployment_dir), "--json", "--sample", "5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(json.dumps(encoder_report.to_json()))
    assert calls[0][0] == deployment_dir and calls[0][1] is None
    assert calls[0][2]["sample"] == 5
    assert main(["audit", str(deployment_dir), "--model", "/x"]) == 0
    out = capsys.readouterr().out
    assert "- keyless sort: a node without the key reads 100.0% of input tokens" in out
    assert "best constant guess" in out and calls[1][1] == Path("/x")


def test_cli_refuses_what_it_cannot_audit(deployment_dir: Path, minilm_dir: Path,
                                          smollm2_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    nokey = tmp_path / "nokey"
    nokey.mkdir()
    shutil.copy(deployment_dir / "manifest.json", nokey / "manifest.json")
    assert main(["audit", str(nokey)]) == 2
    assert "client/key.json not found" in capsys.readouterr().err
    assert main(["audit", str(minilm_dir)]) == 2
    assert "nothing to attack: nodes see plaintext" in capsys.readouterr().err
    assert main(["audit", str(deployment_dir), "--model", str(smollm2_dir)]) == 2
    assert "is not the model" in capsys.readouterr().err
    with pytest.raises(AuditError, match="at least 1"):
        audit_deployment(deployment_dir, minilm_dir, sample=0)


def test_matcher_and_perturbations() -> None:
    rng = np.random.default_rng(0)
    plain = rng.standard_normal((50, 30))
    perm = rng.permutation(50)
    noisy = plain[perm] + 0.1 * rng.standard_normal((50, 30))
    assert np.array_equal(match_rows(plain, noisy), perm)
    assert sorted(assign(rng.random((7, 7))).tolist()) == list(range(7))
    w = {"m": rng.standard_normal((40, 30)), "v": rng.standard_normal(30)}
    dense = perturb_dense(w, ["m"], 0.5, rng)
    rel = np.linalg.norm(dense["m"] - w["m"]) / np.linalg.norm(w["m"])
    assert 0.45 < rel < 0.55 and dense["v"] is w["v"]
    low = perturb_low_rank(w, ["m", "v"], 3, 0.2, rng)
    delta = low["m"] - w["m"]
    assert np.linalg.matrix_rank(delta) == 3
    assert np.linalg.norm(delta) / np.linalg.norm(w["m"]) == pytest.approx(0.2)
    assert low["v"] is w["v"]


def test_decoder_audit(smollm2_deployment: Path, smollm2_dir: Path) -> None:
    # 4 texts, 175 tokens: each token read costs a product with the 49152-row vocabulary, the
    # key recovery does not depend on the sample; at 175 tokens a 0.99 bound allows one miss
    report = audit_deployment(smollm2_deployment, smollm2_dir, sample=4, noise=(0.1,))
    print(report.table())
    assert report.scheme == "ee-decoder/1"
    assert report.row("exact weight matching", "key").success >= 0.99  # measured 1.0
    tokens = report.row("exact weight matching", "input tokens")
    assert tokens.success >= 0.99 and tokens.detail["tokens"] > 150  # 1.0 of 175 (and of 416)
    # Gram-signature matching survives dense noise of 0.1 (measured 1.0; it fails at 0.5)
    assert report.row("robust matching, dense d=0.1", "FFN permutation").success >= 0.95
    assert report.row("robust matching, dense d=0.1", "input tokens").success >= 0.95
    assert report.row("keyless norms", "input tokens").success >= 0.99  # measured 1.0
    length = report.row("length and padding", "sequence length")
    assert length.success == 1.0 and length.detail["mask_sent"] is False


# --- --views: the attacks on what a node recorded (models/audit_views.py) -------------------------

VIEW_TEXTS = [["A man is eating food.", "The audit reads what the node received."],
              ["Recorded tensors are attacked exactly as they were sent."]]


@pytest.fixture(scope="module")
def views_dir(deployment_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models import Manifest, ShardSession
    from models.tokenizer import TextTokenizer

    deploy = Manifest.load(deployment_dir)
    root = tmp_path_factory.mktemp("views") / "received"
    root.mkdir(mode=0o700)
    head = ShardSession(deploy.shard_path(deploy.head), deploy.head, spin=False)
    first, second = deploy.node_shards[0], deploy.node_shards[1]
    node = ShardSession(deploy.shard_path(first), first, spin=False)
    for n, texts in enumerate(VIEW_TEXTS):
        feeds = TextTokenizer(deployment_dir / "client" / "tokenizer.json", MAX_TOKENS)(texts)
        sent = head.run({t.name: feeds[t.name] for t in deploy.head.inputs})
        to_first = {t.name: sent[t.name] for t in first.inputs}
        write_view(root, f"req-{n}", first.cid, to_first)
        if n == 0:  # the second node shard's request for the same texts, as the client sends it
            out = {**to_first, **node.run(to_first)}
            write_view(root, "req-second", second.cid, {t.name: out[t.name]
                                                         for t in second.inputs})
    rng = np.random.default_rng(0)
    write_view(root, "req-unlinked", second.cid, {  # continues no recorded first-shard view
        t.name: rng.standard_normal((1, 4, 384)).astype(np.float32) if t.name != "attention_bias"
        else np.zeros((1, 1, 1, 4), np.float32) for t in second.inputs})
    write_view(root, "req-foreign", "bafkforeign", {"x": np.zeros(3, np.float32)})
    return root


def test_views_are_attacked_against_the_owner_reading(deployment_dir: Path, minilm_dir: Path,
                                                      views_dir: Path) -> None:
    from models import Manifest
    from models.audit_views import audit_views

    report = audit_views(deployment_dir, views_dir, minilm_dir)
    print(report.table())
    assert {r.source for r in report.rows} == {"views"}
    keyless = report.row("keyless sort", "input tokens")
    exact = report.row("exact weight matching", "input tokens")
    assert keyless.success >= 0.99 and exact.success >= 0.99  # measured 1.0
    assert report.row("exact weight matching", "hidden permutation").success == 1.0
    tok = Tokenizer.from_file(str(deployment_dir / "client" / "tokenizer.json"))
    ids = [i for texts in VIEW_TEXTS for t in texts for i, s in
           zip(tok.encode(t).ids, tok.encode(t).special_tokens_mask, strict=True) if not s]
    assert exact.detail["tokens"] == len(ids) and exact.detail["requests"] == 2
    assert exact.baseline == pytest.approx(Counter(ids).most_common(1)[0][1] / len(ids))
    deploy = Manifest.load(deployment_dir)
    assert report.views is not None
    assert [(s["shard"], s["views"]) for s in report.views["shards"]] == [
        (deploy.node_shards[0].cid, 2), (deploy.node_shards[1].cid, 2)]
    assert report.views["other_shards"] == 1
    # the second shard's view of VIEW_TEXTS[0], read by decrypt-then-probe against those texts
    name = next(t.name for t in deploy.node_shards[1].inputs if t.name != "attention_bias")
    probe = report.row(f"decrypt-then-probe [{name}]", "input tokens")
    first_ids = [i for t in VIEW_TEXTS[0] for i, s in
                 zip(tok.encode(t).ids, tok.encode(t).special_tokens_mask, strict=True) if not s]
    assert probe.detail["tokens"] == len(first_ids) and probe.detail["requests"] == 1
    assert probe.success > probe.baseline  # measured 0.43 of 14 (a probe, not an exact reading)
    assert report.views["unscored"] == [
        f"1 of 2 views of node shard {deploy.node_shards[1].index} ({name}) continue no "
        "recorded first-shard view"]
    doc = json.loads(json.dumps(report.to_json()))
    assert all(r["source"] == "views" for r in doc["rows"])
    assert "not scored: 1 of 2 views of node shard" in report.table()


def test_views_without_this_deployments_shards_are_refused(
        deployment_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "rec"
    write_view(root, "r", "bafkelsewhere", {"x": np.zeros(3, np.float32)})
    assert main(["audit", str(deployment_dir), "--views", str(root)]) == 2
    err = capsys.readouterr().err
    assert str(root) in err and "shards found: bafkelsewhere" in err
    assert main(["audit", str(deployment_dir), "--views", str(tmp_path / "none")]) == 2
    assert "index.jsonl" in capsys.readouterr().err
