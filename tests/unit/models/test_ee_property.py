"""Equivariance holds for randomly shaped BERT encoders, not just MiniLM's 384/12/6 shape."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import BertConfig, Pipeline, build_bert_sentence_encoder, encrypt_model_dir
from models.importer import minilm_cuts, write_sharded


def random_bert_weights(cfg: BertConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    h, i = cfg.hidden_size, cfg.intermediate_size

    def m(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": m(cfg.vocab_size, h, scale=1.0),
        "embeddings.position_embeddings.weight": m(cfg.max_position, h),
        "embeddings.token_type_embeddings.weight": m(cfg.type_vocab_size, h),
        "embeddings.LayerNorm.weight": 1 + m(h, scale=0.1),
        "embeddings.LayerNorm.bias": m(h, scale=0.1),
    }
    for layer in range(cfg.num_layers):
        p = f"encoder.layer.{layer}"
        for name in ("query", "key", "value"):
            w[f"{p}.attention.self.{name}.weight"] = m(h, h)
            w[f"{p}.attention.self.{name}.bias"] = m(h)
        w[f"{p}.attention.output.dense.weight"] = m(h, h)
        w[f"{p}.attention.output.dense.bias"] = m(h)
        w[f"{p}.intermediate.dense.weight"] = m(i, h)
        w[f"{p}.intermediate.dense.bias"] = m(i)
        w[f"{p}.output.dense.weight"] = m(h, i)
        w[f"{p}.output.dense.bias"] = m(h)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[f"{p}.{ln}.weight"] = 1 + m(h, scale=0.1)
            w[f"{p}.{ln}.bias"] = m(h, scale=0.1)
    return w


@st.composite
def configs(draw: st.DrawFn) -> tuple[BertConfig, int, int]:
    heads = draw(st.sampled_from([1, 2, 3, 4]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    layers = draw(st.integers(1, 3))
    cfg = BertConfig(hidden_size=heads * head_dim, num_layers=layers, num_heads=heads,
                     intermediate_size=draw(st.sampled_from([8, 12, 32])), layer_norm_eps=1e-12,
                     vocab_size=50, max_position=16, type_vocab_size=2)
    return cfg, draw(st.integers(1, layers)), draw(st.integers(0, 2**32 - 1))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_random_encoders_encrypt_equivariantly(case: tuple[BertConfig, int, int]) -> None:
    cfg, node_shards, seed = case
    rng = np.random.default_rng(seed)
    model = build_bert_sentence_encoder(cfg, random_bert_weights(cfg, rng), "random-bert")
    batch, seq = 3, int(rng.integers(1, cfg.max_position + 1))
    mask = np.ones((batch, seq), np.int64)
    mask[1, seq // 2 + 1:] = 0  # one padded row
    feeds = {"input_ids": rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int64),
             "attention_mask": mask,
             "token_type_ids": rng.integers(0, 2, (batch, seq)).astype(np.int64)}
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    with tempfile.TemporaryDirectory() as tmp:
        write_sharded(model, minilm_cuts(cfg.num_layers, node_shards), Path(tmp) / "m",
                      "random-bert")
        encrypt_model_dir(Path(tmp) / "m", Path(tmp) / "d", seed=seed)
        got = Pipeline(Path(tmp) / "d").run(feeds)["sentence_embedding"]
    assert np.abs(got - expected).max() <= 1e-4
