"""The masked/1 deployment of MiniLM: nodes see only float64 MatMuls on noise-masked rows, the
client runs the rest, and the result equals the plaintext model's; the mask scales rest on norm
bounds that hold on real activations."""

from __future__ import annotations

import math
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from errors import InputError
from models import (
    BITS_PER_TOKEN,
    MASKED,
    EncryptionError,
    Manifest,
    ManifestError,
    MaskedInputError,
    Pipeline,
    ShardSession,
    ShardSpec,
    bucket_length,
    encrypt_model_dir,
    import_onnx,
    mask_sigma,
    node_weight,
    pad_to_bucket,
)
from models.masked import ln_bound, sigma_for
from node.cli import main

LAYERS, HIDDEN, INTER = 6, 384, 1536
KINDS = ("qkv", "o", "up", "down")
WIDTHS = {"qkv": (HIDDEN, 3 * HIDDEN), "o": (HIDDEN, HIDDEN), "up": (HIDDEN, INTER),
          "down": (INTER, HIDDEN)}
BATCH_ROWS = 512  # rows (batch * bucket) per masked query in the equivalence run


@pytest.fixture(scope="module")
def masked(masked_deployment: Path) -> Manifest:
    return Manifest.load(masked_deployment)


def _kind(shard: ShardSpec) -> str:
    return shard.inputs[0].name.split("/")[2]  # masked/{l}/{kind}/in


class MaskingNode:
    """What client and nodes do together, in process: mask the rows with fresh noise, run the
    node shard on x + r and on r (the mask's product, from a second node), subtract."""

    def __init__(self, manifest: Manifest, seed: int) -> None:
        self.sessions = {s.cid: ShardSession(manifest.shard_path(s), s, spin=False)
                         for s in manifest.node_shards}
        self.sigma = {s.cid: mask_sigma(manifest, s) for s in manifest.node_shards}
        self.rng = np.random.default_rng(seed)
        self.max_norm: dict[str, float] = defaultdict(float)  # of the unmasked rows, per shard
        self.min_masked_ratio = math.inf  # ||x + r|| / ||x|| over every row sent

    def __call__(self, shard: ShardSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (name, x), = feeds.items()
        assert x.dtype == np.float64 and x.ndim == 2
        r = self.rng.standard_normal(x.shape)
        r *= self.sigma[shard.cid]
        sent = x + r
        session = self.sessions[shard.cid]
        (out, y), = session.run({name: sent}).items()
        (_, mask_product), = session.run({name: r}).items()
        norms = np.linalg.norm(x, axis=1)
        self.max_norm[shard.cid] = max(self.max_norm[shard.cid], float(norms.max()))
        self.min_masked_ratio = min(self.min_masked_ratio, float(
            (np.linalg.norm(sent, axis=1) / np.maximum(norms, 1e-30)).min()))
        return {out: y - mask_product}


@dataclass
class Run:
    worst: float = 0.0  # max |masked - plaintext| over every sentence embedding coordinate
    rows: int = 0
    count: int = 0
    buckets: dict[int, int] = field(default_factory=dict)  # bucket -> sentences


@pytest.fixture(scope="module")
def masked_run(masked: Manifest, minilm_dir: Path, sentences: list[str],
               ) -> tuple[Run, MaskingNode]:
    """Every sentence through the masked deployment (padded to its bucket, one batch per bucket)
    and through the plaintext model."""
    node = MaskingNode(masked, seed=2026)
    pipeline = Pipeline(masked, node_runner=node)
    plain = Pipeline(minilm_dir)
    assert pipeline.tokenizer is not None and plain.tokenizer is not None
    groups: dict[int, list[str]] = defaultdict(list)
    for text in sentences:
        length = pipeline.tokenizer([text])["input_ids"].shape[1]
        groups[bucket_length(masked, length)].append(text)
    run = Run(buckets={b: len(g) for b, g in sorted(groups.items())})
    for bucket, group in groups.items():
        # batches of at most BATCH_ROWS rows: arrays under glibc's mmap threshold are reused,
        # bigger ones are fresh pages every time (1M page faults, 3x slower, on a small VM)
        per_batch = max(1, BATCH_ROWS // bucket)
        for start in range(0, len(group), per_batch):
            texts = group[start:start + per_batch]
            inputs = pad_to_bucket(masked, pipeline.tokenizer(texts))
            assert inputs["input_ids"].shape == (len(texts), bucket)
            got = pipeline.run(inputs)["sentence_embedding"]
            want = plain.run(plain.tokenizer(texts))["sentence_embedding"]
            run.worst = max(run.worst, float(np.abs(got - want).max()))
            run.rows += inputs["input_ids"].size
            run.count += len(texts)
    return run, node


# --- (a) equivalence ---------------------------------------------------------------------------


def test_masked_equals_plaintext_on_the_sentences(masked_run: tuple[Run, MaskingNode],
                                                  sentences: list[str]) -> None:
    run, node = masked_run
    assert run.count == len(sentences) == 120
    print(f"\nmasked/1 vs plaintext: max |diff| {run.worst:.3g} over {run.count} sentences, "
          f"{run.rows} rows, buckets {run.buckets}")
    assert run.worst <= 1e-6
    # what left the client was noise: every row's norm grew by a large factor
    assert node.min_masked_ratio > 100


# --- layout and node shards (b) ----------------------------------------------------------------


def test_layout_roles_and_tensor_names(masked: Manifest, masked_deployment: Path) -> None:
    assert masked.encryption == MASKED
    roles = [s.role for s in masked.shards]
    assert roles == ["client-head", *(["node", "client"] * 4 * LAYERS), "client-tail"]
    names = [(s.inputs[0].name, s.outputs[0].name) for s in masked.node_shards]
    assert names == [(f"masked/{layer}/{k}/in", f"masked/{layer}/{k}/out")
                     for layer in range(LAYERS) for k in KINDS]
    assert [t.name for t in masked.head.outputs] == ["hidden_0", "attention_bias",
                                                      "masked/0/qkv/in"]
    assert [t.name for t in masked.tail.outputs] == ["sentence_embedding"]
    assert {t.name for t in masked.tail.inputs} == {f"hidden_{LAYERS}", "attention_mask"}
    for shard in masked.shards:
        folder = "shards" if shard.role == "node" else "client"
        assert shard.path == f"{folder}/{shard.cid}.onnx"
        assert all(t.dtype and t.shape for t in (*shard.inputs, *shard.outputs))
    client = masked_deployment / "client"
    assert stat.S_IMODE(client.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in client.iterdir())
    assert not (client / "key.json").exists()  # masked/1 has no key
    assert masked.extra["tokenizer"]["path"] == "client/tokenizer.json"
    assert (client / "tokenizer.json").is_file()
    assert masked.verify_files() == []


def test_node_shards_are_one_bias_free_float64_matmul(masked: Manifest,
                                                      minilm_dir: Path) -> None:
    plain_weights = {}
    for shard in Manifest.load(minilm_dir).node_shards:
        path = minilm_dir / shard.path
        for init in onnx.load(str(path)).graph.initializer:
            plain_weights[init.name] = numpy_helper.to_array(init)
    for shard in masked.node_shards:
        graph = onnx.load(str(masked.shard_path(shard))).graph
        kind, layer = _kind(shard), int(shard.inputs[0].name.split("/")[1])
        assert [n.op_type for n in graph.node] == ["MatMul"]
        assert [i.data_type for i in graph.initializer] == [TensorProto.DOUBLE]
        assert [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)] == \
            [TensorProto.DOUBLE] * 2
        d_in, d_out = WIDTHS[kind]
        assert shard.inputs[0].dtype == shard.outputs[0].dtype == "float64"
        assert list(shard.inputs[0].shape) == ["rows", d_in]
        assert list(shard.outputs[0].shape) == ["rows", d_out]
        weight = node_weight(masked, shard)
        names = {"qkv": ["query", "key", "value"], "o": ["attention_out"], "up": ["ffn_in"],
                 "down": ["ffn_out"]}[kind]
        expected = np.concatenate([plain_weights[f"layer.{layer}.{n}.weight"] for n in names],
                                  axis=1).astype(np.float64)
        np.testing.assert_array_equal(weight, expected)  # the public weights, exactly
    # a Freivalds-style check the client can make with node_weight
    shard = masked.node_shards[0]
    x = np.random.default_rng(0).standard_normal((5, HIDDEN))
    (_, y), = ShardSession(masked.shard_path(shard), shard).run({shard.inputs[0].name: x}).items()
    s = np.random.default_rng(1).standard_normal(3 * HIDDEN)
    assert np.abs(y @ s - x @ (node_weight(masked, shard) @ s)).max() < 1e-9 * np.abs(y).sum()


# --- (c) bounds on real activations, (d) the information bound ----------------------------------


def test_bounds_hold_on_real_activations(masked: Manifest,
                                         masked_run: tuple[Run, MaskingNode]) -> None:
    _, node = masked_run
    shards = masked.extra["masked"]["shards"]
    ratios: dict[str, float] = {}
    for shard in masked.node_shards:
        bound = shards[shard.cid]["input_norm_bound"]
        seen = node.max_norm[shard.cid]
        assert 0 < seen <= bound, shard.inputs[0].name
        ratios[shard.inputs[0].name] = seen / bound
    by_kind = {k: max(r for n, r in ratios.items() if n.split("/")[2] == k) for k in KINDS}
    print("\nmax row norm / bound, per kind: "
          + ", ".join(f"{k} {v:.3f}" for k, v in by_kind.items()))


def test_sigma_meets_the_information_bound(masked: Manifest, minilm_dir: Path) -> None:
    doc = masked.extra["masked"]
    assert doc["mask"] == "veilnet-mask/1"
    assert doc["bits_per_token"] == BITS_PER_TOKEN == 1e-4
    assert doc["views_per_row"] == len(masked.node_shards) == 4 * LAYERS
    loose = tight = 0.0
    for shard in masked.node_shards:
        b, sigma = (doc["shards"][shard.cid][k] for k in ("input_norm_bound", "sigma"))
        d = shard.inputs[0].shape[1]
        assert sigma == pytest.approx(b * math.sqrt(24 / (2 * math.log(2) * 1e-4)), rel=1e-12)
        assert sigma == mask_sigma(masked, shard) == sigma_for(b, 24)
        loose += b * b / (2 * sigma * sigma * math.log(2))
        tight += d / 2 * math.log2(1 + b * b / (d * sigma * sigma))
    assert tight <= loose <= 1e-4 * (1 + 1e-9)
    # layer 0's qkv bound is the embedding LayerNorm's, recomputed from the plaintext model
    plain = Manifest.load(minilm_dir)
    head = {i.name: numpy_helper.to_array(i)
            for i in onnx.load(str(plain.shard_path(plain.head))).graph.initializer}
    gamma, beta = (head[f"embeddings.ln.{n}"].astype(np.float64) for n in ("weight", "bias"))
    b0 = math.sqrt(HIDDEN) * np.abs(gamma).max() + np.linalg.norm(beta)
    assert doc["shards"][masked.node_shards[0].cid]["input_norm_bound"] == \
        pytest.approx(b0, rel=1e-9) == ln_bound(gamma, beta)
    print(f"\ninformation over {doc['views_per_row']} views: <= {loose:.6g} bits (tight "
          f"{tight:.6g}); sigmas {min(s['sigma'] for s in doc['shards'].values()):.4g} to "
          f"{max(s['sigma'] for s in doc['shards'].values()):.4g}")


# --- (e) errors ---------------------------------------------------------------------------------


def _tiny_model_dir(tmp_path: Path) -> Path:
    """A two-MatMul user model (family unset), imported as head, one node shard, tail."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), f"w{i}")
             for i in range(3)]
    nodes = [helper.make_node("MatMul", [src, f"w{i}"], [dst])
             for i, (src, dst) in enumerate([("x", "h0"), ("h0", "h1"), ("h1", "y")])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "tiny.onnx"))
    import_onnx(tmp_path / "tiny.onnx", ["h0", "h1"], tmp_path / "model")
    return tmp_path / "model"


def test_non_bert_model_is_refused(tmp_path: Path) -> None:
    model_dir = _tiny_model_dir(tmp_path)
    out = tmp_path / "deploy"
    with pytest.raises(EncryptionError, match=r"masked/1 covers bert-encoder .* family None"):
        encrypt_model_dir(model_dir, out, scheme="masked")
    assert not out.exists()  # nothing left behind
    assert isinstance(EncryptionError("x"), InputError)


def test_unknown_scheme_seed_and_encrypted_input_are_refused(
        minilm_dir: Path, masked_deployment: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(EncryptionError, match=r"unknown encryption scheme 'rot13'.*'ee'.*"
                                              r"'masked'"):
        encrypt_model_dir(minilm_dir, tmp_path / "a", scheme="rot13")
    with pytest.raises(EncryptionError, match="--seed applies to the 'ee' scheme only"):
        encrypt_model_dir(minilm_dir, tmp_path / "b", seed=1, scheme="masked")
    with pytest.raises(ManifestError, match=r"already encrypted \(masked/1\)"):
        encrypt_model_dir(masked_deployment, tmp_path / "c", scheme="masked")
    with pytest.raises(SystemExit):
        main(["model", "encrypt", str(minilm_dir), "--out", str(tmp_path / "d"),
              "--scheme", "rot13"])
    assert "invalid choice: 'rot13'" in capsys.readouterr().err
    code = main(["model", "encrypt", str(_tiny_model_dir(tmp_path)), "--out",
                 str(tmp_path / "e"), "--scheme", "masked"])
    assert code == 2
    assert "covers bert-encoder" in capsys.readouterr().err


def test_accessors_refuse_what_they_do_not_know(masked: Manifest, minilm_manifest: Manifest,
                                                ) -> None:
    with pytest.raises(ManifestError, match=r"not a masked/1 deployment \(none\)"):
        mask_sigma(minilm_manifest, minilm_manifest.node_shards[0])
    with pytest.raises(ManifestError, match="not a masked/1 deployment"):
        bucket_length(minilm_manifest, 3)
    with pytest.raises(ManifestError, match="not a node shard"):
        mask_sigma(masked, masked.head)
    with pytest.raises(ManifestError, match="not a node shard"):
        node_weight(masked, masked.head)


# --- (f) buckets --------------------------------------------------------------------------------


def test_buckets(masked: Manifest) -> None:
    assert masked.extra["masked"]["buckets"] == [16, 32, 64, 128, 256, 512]
    for length, bucket in [(1, 16), (15, 16), (16, 16), (17, 32), (100, 128), (256, 256),
                           (257, 512), (512, 512)]:
        assert bucket_length(masked, length) == bucket, length
    for bad in (0, 513, 10_000):
        with pytest.raises(MaskedInputError, match=r"bucket|at least one"):
            bucket_length(masked, bad)
    assert issubclass(MaskedInputError, InputError)

    ids = np.arange(1, 35, dtype=np.int64).reshape(2, 17)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids),
              "token_type_ids": np.zeros_like(ids), "other": np.ones(3)}
    padded = pad_to_bucket(masked, inputs)
    assert padded["input_ids"].shape == padded["attention_mask"].shape == (2, 32)
    np.testing.assert_array_equal(padded["input_ids"][:, :17], ids)
    assert not padded["input_ids"][:, 17:].any() and not padded["attention_mask"][:, 17:].any()
    assert padded["token_type_ids"].shape == (2, 32)
    assert padded["other"] is inputs["other"]
    with pytest.raises(MaskedInputError, match="longer than the largest bucket"):
        pad_to_bucket(masked, {"input_ids": np.zeros((1, 600), np.int64)})
