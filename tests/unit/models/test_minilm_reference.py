"""The ONNX MiniLM built from the package's weights against sentence-transformers' own output
(golden vectors made by scripts/make_reference_embeddings.py with torch, an independent
implementation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from models import Pipeline, TextTokenizer, locate

REFERENCE = json.loads((Path(__file__).parents[2] / "data" / "minilm_reference.json").read_text())


def test_tokenizer_matches_sentence_transformers_token_counts() -> None:
    src = locate()
    tok = TextTokenizer(src.tokenizer, src.max_seq_length)
    assert src.max_seq_length == REFERENCE["max_seq_length"]
    counts = [int(tok([s])["attention_mask"].sum()) for s in REFERENCE["sentences"]]
    assert counts == REFERENCE["token_counts"]


def test_unsplit_onnx_matches_sentence_transformers(minilm_model: onnx.ModelProto) -> None:
    src = locate()
    feeds = TextTokenizer(src.tokenizer, src.max_seq_length)(REFERENCE["sentences"])
    session = ort.InferenceSession(minilm_model.SerializeToString())
    ours = session.run(["sentence_embedding"], feeds)[0]
    ref = np.array(REFERENCE["embeddings"], dtype=np.float32)
    assert ours.shape == ref.shape == (len(REFERENCE["sentences"]), 384)
    assert np.abs(ours - ref).max() < 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_sharded_plaintext_and_encrypted_match_sentence_transformers(
        minilm_dir: Path, deployment_dir: Path) -> None:
    ref = np.array(REFERENCE["embeddings"], dtype=np.float32)
    for directory in (minilm_dir, deployment_dir):
        got = Pipeline(directory).embed(REFERENCE["sentences"])
        assert np.abs(got - ref).max() < 1e-5, directory
