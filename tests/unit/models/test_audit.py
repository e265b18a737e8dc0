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
from tokenizers import Tokenizer

import models.audit
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
    assert len(doc["rows"]) == 8  # key, tokens, 2 x (perm, tokens), keyless, length
    for row in doc["rows"]:
        assert set(row) == {"attack", "target", "success", "baseline", "detail", "seconds"}
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
    report = audit_deployment(smollm2_deployment, smollm2_dir, sample=12, noise=(0.1,))
    print(report.table())
    assert report.scheme == "ee-decoder/1"
    assert report.row("exact weight matching", "key").success >= 0.99  # measured 1.0
    assert report.row("exact weight matching", "input tokens").success >= 0.99  # 1.0
    # Gram-signature matching survives dense noise of 0.1 (measured 1.0; it fails at 0.5)
    assert report.row("robust matching, dense d=0.1", "FFN permutation").success >= 0.95
    assert report.row("robust matching, dense d=0.1", "input tokens").success >= 0.95
    assert report.row("keyless norms", "input tokens").success >= 0.99  # measured 1.0
    length = report.row("length and padding", "sequence length")
    assert length.success == 1.0 and length.detail["mask_sent"] is False
