"""Running the encrypted deployment's shards in order gives the plaintext model's output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import Pipeline, TextTokenizer, encrypt_model_dir


def _plaintext(model: onnx.ModelProto, tokenizer: TextTokenizer, texts: list[str]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString())
    return np.concatenate([session.run(["sentence_embedding"], tokenizer(texts[i:i + 16]))[0]
                           for i in range(0, len(texts), 16)])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_encrypted_equals_plaintext_on_100_plus_sentences(
        deployment_dir: Path, minilm_model: onnx.ModelProto, sentences: list[str]) -> None:
    assert len(sentences) >= 100
    pipeline = Pipeline(deployment_dir)
    assert pipeline.manifest.encryption == "ee-encoder/1"
    assert pipeline.tokenizer is not None
    plain = _plaintext(minilm_model, pipeline.tokenizer, sentences)
    enc = np.concatenate([pipeline.embed(sentences[i:i + 16])
                          for i in range(0, len(sentences), 16)])
    assert enc.shape == plain.shape == (len(sentences), 384)
    assert np.abs(enc - plain).max() <= 1e-4
    assert _cosines(enc, plain).min() >= 0.99999


def test_batching_does_not_change_results(deployment_dir: Path, sentences: list[str]) -> None:
    pipeline = Pipeline(deployment_dir)
    together = pipeline.embed(sentences[:12])
    alone = np.concatenate([pipeline.embed([s]) for s in sentences[:12]])
    assert np.abs(together - alone).max() <= 1e-5


@pytest.mark.parametrize("node_shards", [1, 3])
def test_other_splits_and_fresh_keys(tmp_path: Path, node_shards: int,
                                     minilm_model: onnx.ModelProto, sentences: list[str]) -> None:
    from models import import_minilm

    model_dir = tmp_path / "model"
    import_minilm(model_dir, node_shards=node_shards)
    deploy = tmp_path / "deploy"
    encrypt_model_dir(model_dir, deploy)  # fresh CSPRNG key
    pipeline = Pipeline(deploy)
    assert len(pipeline.manifest.node_shards) == node_shards
    assert pipeline.tokenizer is not None
    texts = sentences[::7]
    plain = _plaintext(minilm_model, pipeline.tokenizer, texts)
    enc = pipeline.embed(texts)
    assert np.abs(enc - plain).max() <= 1e-4
    assert _cosines(enc, plain).min() >= 0.99999


def test_two_encryptions_use_different_keys(tmp_path: Path, minilm_dir: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    da, db = encrypt_model_dir(minilm_dir, a), encrypt_model_dir(minilm_dir, b)
    assert {s.cid for s in da.node_shards}.isdisjoint({s.cid for s in db.node_shards})
    assert (a / "client" / "key.json").read_bytes() != (b / "client" / "key.json").read_bytes()
