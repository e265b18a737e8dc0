"""``ee-decoder/1``: SmolLM2-135M encrypted once (``encrypted_smollm2``, fixed seed) and run
in-process against the plaintext model (an independent computation: the plaintext shards),
and small random llama decoders for the code paths that need many encryptions (seeds,
configurations, refusals).

Measured on SmolLM2 (the figures docs/threat-model.md quotes): logits differ from plaintext by at
most about 1.4e-4 (logits up to about 38) at prefill and over 8 cached steps; greedy generations
are identical.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tokenizers import Tokenizer

from crypto.ee_key import KeyFormatError
from models import Manifest, ManifestError, Pipeline, encrypt_model_dir
from models.ee_decoder_key import KEY_FORMAT, DecoderKey
from models.ee_plan import EncryptionError
from models.gguf_tokenizer import chat_prompt
from models.importer import write_sharded
from models.llama_graph import LlamaConfig, build_llama_decoder
from models.llama_import import llama_cuts

LOGIT_ATOL = 1e-3  # measured about 1.4e-4 on logits up to about 38


@pytest.fixture(scope="module")
def deploy(smollm2_deployment: Path) -> Path:
    return smollm2_deployment


class Decoder:
    """Prefill, then cached steps; the KV cache (past_* = the previous present_*) fed back."""

    def __init__(self, pipeline: Pipeline) -> None:
        cfg = pipeline.manifest.extra["config"]
        self.pipeline, self.layers = pipeline, cfg["num_layers"]
        self.cache = {f"past_{kind}_{i}": np.zeros((1, cfg["num_kv_heads"], 0, cfg["head_dim"]),
                                                   np.float32)
                      for i in range(self.layers) for kind in ("key", "value")}

    def __call__(self, ids: list[int]) -> np.ndarray:
        out = self.pipeline.run({"input_ids": np.array([ids], np.int64), **self.cache})
        self.cache = {f"past_{kind}_{i}": out[f"present_{kind}_{i}"]
                      for i in range(self.layers) for kind in ("key", "value")}
        return out["logits"][0]


def prompts(deploy: Path) -> list[list[int]]:
    """A chat prompt and a plain one, tokenized with the deployment's client-side files."""
    tok = Tokenizer.from_file(str(deploy / "client" / "tokenizer.json"))
    template = (deploy / "client" / "chat_template.jinja").read_text()
    chat = chat_prompt(template, [{"role": "user", "content": "What is the capital of France?"}])
    return [tok.encode(chat, add_special_tokens=False).ids,
            tok.encode("The history of the Roman empire began", add_special_tokens=False).ids]


# --- SmolLM2 -------------------------------------------------------------------------------------

def test_deployment_layout_and_manifest(smollm2_dir: Path, deploy: Path) -> None:
    plain, enc = Manifest.load(smollm2_dir), Manifest.load(deploy)
    assert enc.encryption == "ee-decoder/1" and enc.extra["parent"] == plain.cid
    assert [s.role for s in enc.shards] == ["client-head", "node", "client", "node", "client",
                                            "node", "client-tail"]
    for field in ("config", "kv_cache", "source"):
        assert enc.extra[field] == plain.extra[field]
    assert (enc.inputs, enc.outputs) == (plain.inputs, plain.outputs)
    assert enc.extra["tokenizer"]["path"] == "client/tokenizer.json"
    assert enc.extra["chat_template"]["path"] == "client/chat_template.jinja"
    assert enc.verify_files() == []
    # node shards: plaintext boundary names, except the stream re-based by the client shard
    for p, e in zip(plain.node_shards, enc.node_shards, strict=True):
        assert e.path.startswith("shards/") and e.outputs == p.outputs
        renamed = {t.name: t.name + ".rebased" for t in p.inputs if t.name in ("hidden_9",
                                                                             "hidden_19")}
        assert [t.name for t in e.inputs] == [renamed.get(t.name, t.name) for t in p.inputs]
    rebases = [s for s in enc.shards if s.role == "client"]
    assert [(s.inputs[0].name, s.outputs[0].name) for s in rebases] == [
        ("hidden_9", "hidden_9.rebased"), ("hidden_19", "hidden_19.rebased")]
    # client/ is the secret: 0700, every file 0600; nothing else holds key material
    assert stat.S_IMODE((deploy / "client").stat().st_mode) == 0o700
    for path in (deploy / "client").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for s in enc.shards:
        assert s.path.startswith("shards/" if s.role == "node" else "client/")
    key = DecoderKey.load(deploy / "client" / "key.json")
    assert key.deployment == enc.cid and [s.index for s in key.shards] == [1, 3, 5]
    doc = json.loads((deploy / "manifest.json").read_text())
    assert "rotation" not in json.dumps(doc) and KEY_FORMAT not in json.dumps(doc)


def test_client_sdk_loads_client_role_shards(deploy: Path) -> None:
    from client.deployment import check_secret_files, load_pipeline

    manifest = Manifest.load(deploy)
    check_secret_files(manifest)
    pipeline = load_pipeline(deploy, threads=1)
    local = {s.index for s in manifest.shards if s.role != "node"}
    assert set(pipeline._sessions) == local == {0, 2, 4, 6}


def test_logits_match_plaintext_at_prefill_and_cached_steps(smollm2_dir: Path,
                                                            deploy: Path) -> None:
    plain = Decoder(Pipeline(smollm2_dir, threads=2, spin=False))
    enc = Decoder(Pipeline(deploy, threads=2, spin=False))
    ids = prompts(deploy)[0]
    worst, scale = 0.0, 0.0
    p, e = plain(ids), enc(ids)
    for _ in range(9):  # prefill, then 8 cached single-token steps
        assert p.shape == e.shape
        worst, scale = max(worst, float(np.abs(p - e).max())), max(scale, float(np.abs(p).max()))
        assert int(p[-1].argmax()) == int(e[-1].argmax())
        token = int(p[-1].argmax())
        p, e = plain([token]), enc([token])
    print(f"ee-decoder/1 max |logit diff| {worst:.3g} (logits up to {scale:.3g})")
    assert worst <= LOGIT_ATOL and scale > 10


@pytest.mark.parametrize("which", [0, 1], ids=["chat", "text"])
def test_greedy_generation_is_identical(smollm2_dir: Path, deploy: Path, which: int) -> None:
    runs = []
    for directory in (smollm2_dir, deploy):
        decode = Decoder(Pipeline(directory, threads=2, spin=False))
        logits, tokens = decode(prompts(deploy)[which]), []
        while len(tokens) < 32:
            tokens.append(int(logits[-1].argmax()))
            logits = decode(tokens[-1:])
        runs.append(tokens)
    assert runs[0] == runs[1]


def test_key_file_round_trips_and_refuses_bad_ones(deploy: Path, tmp_path: Path) -> None:
    key = DecoderKey.load(deploy / "client" / "key.json")
    again = DecoderKey.from_json(json.loads(json.dumps(key.to_json())))
    assert again.to_json() == key.to_json()
    doc: dict[str, Any] = key.to_json()
    with pytest.raises(KeyFormatError, match="not a veilnet ee-decoder key"):
        DecoderKey.from_json({**doc, "format": "veilnet-ee-key/1"})
    bad = json.loads(json.dumps(doc))
    bad["shards"][0]["rotation"] = DecoderKey.from_json(doc).to_json()["layers"]["0"]["ffn_scale"]
    with pytest.raises(KeyFormatError, match="rotation"):
        DecoderKey.from_json(bad)
    bad = json.loads(json.dumps(doc))
    bad["layers"]["3"]["kv_perm"] = [0, 0, 1]
    with pytest.raises(KeyFormatError, match="layer 3: not a permutation"):
        DecoderKey.from_json(bad)
    (tmp_path / "k.json").write_text("{")
    with pytest.raises(KeyFormatError, match="cannot read key file"):
        DecoderKey.load(tmp_path / "k.json")


def test_encrypting_a_deployment_again_is_refused(deploy: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"already encrypted \(ee-decoder/1\)"):
        encrypt_model_dir(deploy, tmp_path / "again")
    assert not (tmp_path / "again").exists()


# --- small random decoders -----------------------------------------------------------------------

def tiny_llama(out: Path, node_shards: int = 2, heads: int = 4, kv: int = 2, layers: int = 4,
               seed: int = 0) -> Path:
    """A random llama decoder (norm weights not ones), imported as `model import` does."""
    cfg = LlamaConfig(n_layers=layers, d_model=32, n_heads=heads, n_kv_heads=kv, head_dim=8,
                      ffn=48, vocab=64, rope_theta=10000.0, rms_eps=1e-5)
    rng = np.random.default_rng(seed)
    d, hd = cfg.d_model, cfg.head_dim
    w = {"token_embd.weight": rng.normal(size=(cfg.vocab, d)),
         "output_norm.weight": 1 + 0.3 * rng.normal(size=d)}
    shapes = {"attn_norm": (d,), "attn_q": (heads * hd, d), "attn_k": (kv * hd, d),
              "attn_v": (kv * hd, d), "attn_output": (d, heads * hd), "ffn_norm": (d,),
              "ffn_gate": (cfg.ffn, d), "ffn_up": (cfg.ffn, d), "ffn_down": (d, cfg.ffn)}
    for i in range(layers):
        for kind, shape in shapes.items():
            w[f"blk.{i}.{kind}.weight"] = (1 + 0.3 * rng.normal(size=shape) if len(shape) == 1
                                           else rng.normal(size=shape) / np.sqrt(shape[1]))
    config = {"family": "llama-decoder", "num_layers": layers, "hidden_size": d,
              "num_heads": heads, "num_kv_heads": kv, "head_dim": hd, "intermediate_size": 48,
              "vocab_size": cfg.vocab}
    write_sharded(build_llama_decoder(cfg, {k: v.astype(np.float32) for k, v in w.items()}),
                  llama_cuts(layers, node_shards), out, "tiny-llama", {"config": config})
    return out


def _max_diff(plain_dir: Path, enc_dir: Path, ids: list[int], steps: int = 3) -> float:
    plain = Decoder(Pipeline(plain_dir, threads=1))
    enc = Decoder(Pipeline(enc_dir, threads=1))
    worst = 0.0
    for k in range(steps + 1):
        chunk = ids if k == 0 else [(7 * k) % 64, (11 * k) % 64][: 1 + k % 2]
        worst = max(worst, float(np.abs(plain(chunk) - enc(chunk)).max()))
    return worst


@pytest.mark.parametrize(("node_shards", "heads", "kv"),
                         [(1, 4, 2), (2, 4, 4), (3, 4, 1), (4, 6, 2)],
                         ids=["1-shard", "mha", "mqa", "4-shards"])
def test_random_decoders_match_plaintext(tmp_path: Path, node_shards: int, heads: int,
                                         kv: int) -> None:
    plain = tiny_llama(tmp_path / "m", node_shards, heads, kv, seed=node_shards)
    manifest = encrypt_model_dir(plain, tmp_path / "d", seed=node_shards)
    roles = [s.role for s in manifest.shards]
    assert roles == ["client-head", *(["node", "client"] * node_shards)[:-1], "client-tail"]
    assert _max_diff(plain, tmp_path / "d", [3, 1, 4, 1, 5, 9, 2, 6]) < 1e-4


def test_same_seed_same_deployment_other_seed_other_key(tmp_path: Path) -> None:
    plain = tiny_llama(tmp_path / "m")
    one = encrypt_model_dir(plain, tmp_path / "a", seed=5)
    two = encrypt_model_dir(plain, tmp_path / "b", seed=5)
    other = encrypt_model_dir(plain, tmp_path / "c", seed=6)
    assert one.cid == two.cid
    assert (tmp_path / "a/client/key.json").read_bytes() == (tmp_path / "b/client/key.json"
                                                              ).read_bytes()
    assert not {s.cid for s in one.shards} & {s.cid for s in other.shards}
    keys = [DecoderKey.load(tmp_path / x / "client" / "key.json") for x in "ac"]
    assert not np.allclose(keys[0].shards[0].rotation, keys[1].shards[0].rotation)
    fresh = encrypt_model_dir(plain, tmp_path / "e")  # no seed: the OS CSPRNG
    assert not {s.cid for s in fresh.shards} & {s.cid for s in one.shards}


def test_unknown_graph_is_refused_and_nothing_written(tmp_path: Path) -> None:
    plain = tiny_llama(tmp_path / "m")
    manifest = Manifest.load(plain)
    path = manifest.shard_path(manifest.node_shards[0])
    model = onnx.load(str(path))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "extra.bias"))
    data = model.SerializeToString()
    path.write_bytes(data)
    doc = json.loads(manifest.dumps())
    from models.cid import cid_of_bytes

    doc["shards"][1]["cid"], doc["shards"][1]["size"] = cid_of_bytes(data), len(data)
    (plain / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(EncryptionError, match=r"node shard 1: initializer 'extra.bias'"):
        encrypt_model_dir(plain, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    assert not list(tmp_path.glob(".d.partial-*"))


def test_cli_encrypts_a_decoder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from node_helpers import veilnet_in_process as veilnet

    plain = tiny_llama(tmp_path / "m")
    result = veilnet(capsys, "model", "encrypt", str(plain), "--out", str(tmp_path / "d"),
                     "--seed", "3")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert Path(out["key"]).is_file() and len(out["node_shards"]) == 2
    assert veilnet(capsys, "model", "verify", str(tmp_path / "d")).returncode == 0
