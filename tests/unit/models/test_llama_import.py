"""SmolLM2-135M-Instruct imported from its GGUF (``veilnet model import smollm2``), against golden
values made once with Hugging Face transformers (scripts/make_reference_logits.py, stored in
tests/data/smollm2_reference.json): tokenizer ids, chat prompts, prefill and cached-decode logits
of the split model run shard by shard, and greedy generations.

The split model runs in-process here (``Pipeline``: client head, three node shards of ten
layers, client tail, tensors passed by name, the KV cache passed back as ``past_*``).
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from models import Manifest, Pipeline
from models.gguf_tokenizer import chat_prompt
from models.llama_import import llama_cuts

REFERENCE = json.loads((Path(__file__).resolve().parents[2] / "data" /
                        "smollm2_reference.json").read_text())
ATOL = 1e-3  # float32 onnxruntime against float32 transformers (sdpa), 30 layers


@pytest.fixture(scope="module")
def model(smollm2_dir: Path) -> Pipeline:
    return Pipeline(smollm2_dir, threads=2, spin=False)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


class Decoder:
    """Prefill, then one token at a time, with the KV cache fed back by name."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        cfg = pipeline.manifest.extra["config"]
        self.layers, self.kv, self.hd = cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]
        self.cache: dict[str, np.ndarray] = {
            f"past_{kind}_{i}": np.zeros((1, self.kv, 0, self.hd), np.float32)
            for i in range(self.layers) for kind in ("key", "value")}

    def __call__(self, ids: list[int]) -> np.ndarray:
        out = self.pipeline.run({"input_ids": np.array([ids], np.int64), **self.cache})
        self.cache = {f"past_{kind}_{i}": out[f"present_{kind}_{i}"]
                      for i in range(self.layers) for kind in ("key", "value")}
        return out["logits"][0, -1]


def assert_logits(got: np.ndarray, ref: dict[str, Any], where: str) -> None:
    top_ids = np.array(ref["top"]["ids"])
    np.testing.assert_allclose(got[top_ids], ref["top"]["values"], atol=ATOL, err_msg=where)
    fixed = np.array(REFERENCE["logits_format"]["fixed_logit_ids"])
    np.testing.assert_allclose(got[fixed], ref["fixed"], atol=ATOL, err_msg=where)
    assert int(got.argmax()) == int(top_ids[0]), where


def test_manifest_is_u_shaped_with_the_cache_on_the_nodes(smollm2_dir: Path) -> None:
    manifest = Manifest.load(smollm2_dir)
    cfg = manifest.extra["config"]
    assert cfg["family"] == "llama-decoder" and cfg["num_layers"] == REFERENCE["config"][
        "num_hidden_layers"]
    roles = [s.role for s in manifest.shards]
    assert roles == ["client-head", "node", "node", "node", "client-tail"]
    cuts = llama_cuts(cfg["num_layers"], 3)
    served: list[int] = []
    for shard, (start, end) in zip(manifest.node_shards, pairwise(cuts), strict=True):
        names = {t.name for t in shard.inputs}
        assert start in names and end in {t.name for t in shard.outputs}
        layers = sorted(int(n.rsplit("_", 1)[1]) for n in names if n.startswith("past_key_"))
        served += layers
        assert {f"present_key_{i}" for i in layers} <= {t.name for t in shard.outputs}
    assert served == list(range(cfg["num_layers"]))  # each layer's cache on exactly one shard
    head, tail = manifest.shards[0], manifest.shards[-1]
    assert [t.name for t in head.inputs] == ["input_ids"]
    assert not any(t.name.startswith("past_") for t in (*head.inputs, *tail.inputs))
    assert [t.name for t in tail.outputs] == ["logits"]


def test_tokenizer_matches_transformers(tokenizer: Tokenizer) -> None:
    """Same ids as transformers' GGUF tokenizer, except where a digit follows whitespace or
    another numeral: SmolLM2 (and llama.cpp's "smollm" pre-tokenizer) split digits one by
    one, transformers' GGUF converter does not; there every digit is its own token here."""
    differ = []
    for case in REFERENCE["tokenizer"]["texts"]:
        ids = tokenizer.encode(case["text"], add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == case["text"]
        if ids != case["ids"]:
            differ.append(case["text"])
            digits = [t for t in tokenizer.encode(case["text"]).tokens
                      if any(ch.isdigit() for ch in t)]
            assert all(sum(ch.isdigit() for ch in t) == 1 for t in digits), case["text"]
    assert len(differ) <= 2, differ  # "  123  and  42..." and "½ ² ³ Ⅻ ١٢٣ ٤"


def test_chat_prompts_match_transformers(smollm2_dir: Path, tokenizer: Tokenizer) -> None:
    template = (smollm2_dir / "chat_template.jinja").read_text()
    for case in REFERENCE["chat"]:
        text = chat_prompt(template, case["messages"])
        assert text == case["text"]
        assert tokenizer.encode(text, add_special_tokens=False).ids == case["ids"]


@pytest.mark.parametrize("index", range(len(REFERENCE["cases"])))
def test_prefill_and_cached_logits_match_transformers(model: Pipeline, index: int) -> None:
    case = REFERENCE["cases"][index]
    decode = Decoder(model)
    logits = decode(case["prompt_ids"])
    assert_logits(logits, case["prefill"], f"case {index} prefill")
    for step in case["decode"]:  # 8 cached steps, each feeding transformers' greedy token
        logits = decode([step["input_id"]])
        assert_logits(logits, step, f"case {index} step at position {step['position']}")


# a chat prompt and a plain one: 32 greedy tokens each (every case's logits are checked above)
@pytest.mark.parametrize("index", [0, 5])
def test_greedy_tokens_match_transformers(model: Pipeline, index: int) -> None:
    case = REFERENCE["cases"][index]
    assert case["kind"] == ("chat" if index == 0 else "text")
    decode = Decoder(model)
    greedy: list[int] = []
    logits = decode(case["prompt_ids"])
    while len(greedy) < len(case["greedy"]["ids"]):
        greedy.append(int(logits.argmax()))
        logits = decode(greedy[-1:])
    assert greedy == case["greedy"]["ids"], (index, case["greedy"]["text"])


def test_cli_says_what_a_decoder_cannot_do_yet(smollm2_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from node_helpers import veilnet_in_process as veilnet

    result = veilnet(capsys, "model", "run", str(smollm2_dir), "hello")
    assert result.returncode == 2 and "is a text decoder" in result.stderr
    result = veilnet(capsys, "model", "import", "gguf", "--out", str(tmp_path / "g"))
    assert result.returncode == 2 and "name the file" in result.stderr
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"GGML" + bytes(60))
    result = veilnet(capsys, "model", "import", "gguf", str(not_gguf), "--out",
                     str(tmp_path / "g"))
    assert result.returncode == 2 and "not a GGUF file" in result.stderr
    result = veilnet(capsys, "model", "import", "minilm", str(not_gguf), "--out",
                     str(tmp_path / "g"))
    assert result.returncode == 2 and "only 'gguf' takes a FILE" in result.stderr
    assert not (tmp_path / "g").exists()
