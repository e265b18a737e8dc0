"""encrypt_model_dir: graphs the scheme does not cover, bad inputs, a user MLP that it does cover,
and what the MiniLM deployment contains."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import (
    EncryptionError,
    Manifest,
    ManifestError,
    OutputDirError,
    Pipeline,
    encrypt_model_dir,
    import_onnx,
)

OPSET = 17
IR_VERSION = 9
W = 8  # every layer has this width


def _weight(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    value = rng.standard_normal(shape) / np.sqrt(shape[0])
    return numpy_helper.from_array(value.astype(np.float32), name)


def _fvi(name: str, *shape: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _save(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
          outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto], path: Path) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _import(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], cuts: list[str],
            tmp_path: Path, x_shape: tuple[int | str, ...] = ("batch", W),
            y_shape: tuple[int | str, ...] = ("batch", W)) -> Path:
    src = _save(nodes, [_fvi("x", *x_shape)], [_fvi("y", *y_shape)], inits,
                tmp_path / "user.onnx")
    out = tmp_path / "model"
    import_onnx(src, cuts, out)
    return out


def _head_and_tail(rng: np.random.Generator) -> tuple[list[onnx.NodeProto],
                                                      list[onnx.NodeProto],
                                                      list[onnx.TensorProto]]:
    """head: h0 = x We + be;  tail: y = h_last Wo + bo (h_last is called 'hz')."""
    mk = helper.make_node
    head = [mk("MatMul", ["x", "We"], ["xe"], name="embed/mm"),
            mk("Add", ["xe", "be"], ["h0"], name="embed/add")]
    tail = [mk("MatMul", ["hz", "Wo"], ["ho"], name="out/mm"),
            mk("Add", ["ho", "bo"], ["y"], name="out/add")]
    inits = [_weight(rng, "We", W, W), _weight(rng, "be", W),
             _weight(rng, "Wo", W, W), _weight(rng, "bo", W)]
    return head, tail, inits


def _assert_nothing_written(tmp_path: Path, name: str = "deploy") -> None:
    assert not (tmp_path / name).exists()
    assert list(tmp_path.glob(f".{name}.partial-*")) == []


# --- graphs the scheme has no rule for ------------------------------------------------------------


def _sin_model(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    head, tail, inits = _head_and_tail(rng)
    mk = helper.make_node
    body = [mk("MatMul", ["h0", "W1"], ["g"], name="body/mm1"),
            mk("Sin", ["g"], ["g_sin"], name="body/the_sine"),
            mk("MatMul", ["g_sin", "W2"], ["hz"], name="body/mm2")]
    inits += [_weight(rng, "W1", W, W), _weight(rng, "W2", W, W)]
    return _import(head + body + tail, inits, ["h0", "hz"], tmp_path)


def _cos_after_relu_block_model(tmp_path: Path) -> Path:
    """Two node shards; the first is encryptable, the second has a Cos on an encrypted tensor."""
    rng = np.random.default_rng(2)
    head, tail, inits = _head_and_tail(rng)
    mk = helper.make_node
    body = [mk("MatMul", ["h0", "W1"], ["a"], name="one/mm"),
            mk("Add", ["a", "b1"], ["ab"], name="one/add"),
            mk("Relu", ["ab"], ["h1"], name="one/relu"),
            mk("MatMul", ["h1", "W2"], ["c"], name="two/mm"),
            mk("Cos", ["c"], ["hz"], name="two/the_cosine")]
    inits += [_weight(rng, "W1", W, W), _weight(rng, "b1", W), _weight(rng, "W2", W, W)]
    return _import(head + body + tail, inits, ["h0", "h1", "hz"], tmp_path)


def _activation_matmul_model(tmp_path: Path) -> Path:
    """A node shard that multiplies two activations (no softmax, not an attention block)."""
    rng = np.random.default_rng(3)
    head, tail, inits = _head_and_tail(rng)
    mk = helper.make_node
    body = [mk("MatMul", ["h0", "Wa"], ["pa"], name="body/proj_a"),
            mk("MatMul", ["h0", "Wb"], ["pb"], name="body/proj_b"),
            mk("MatMul", ["pa", "pb"], ["hz"], name="body/act_times_act")]
    inits += [_weight(rng, "Wa", W, W), _weight(rng, "Wb", W, W)]
    return _import(head + body + tail, inits, ["h0", "hz"], tmp_path,
                   x_shape=("batch", W, W), y_shape=("batch", W, W))


def _conv_after_matmul_model(tmp_path: Path) -> Path:
    """h0 [batch, 8, 8] -> MatMul (encrypted last axis) -> Conv (1-D, 8 channels) -> ..."""
    rng = np.random.default_rng(4)
    head, tail, inits = _head_and_tail(rng)
    mk = helper.make_node
    body = [mk("MatMul", ["h0", "W1"], ["g"], name="body/mm1"),
            mk("Conv", ["g", "K"], ["hz"], name="body/the_conv", pads=[1, 1])]
    inits += [_weight(rng, "W1", W, W), _weight(rng, "K", W, W, 3)]
    return _import(head + body + tail, inits, ["h0", "hz"], tmp_path,
                   x_shape=("batch", W, W), y_shape=("batch", W, W))


@pytest.mark.parametrize(
    ("build", "node_name", "op"),
    [
        (_sin_model, "body/the_sine", "Sin"),
        (_cos_after_relu_block_model, "two/the_cosine", "Cos"),
        (_activation_matmul_model, "body/act_times_act", "MatMul"),
        (_conv_after_matmul_model, "body/the_conv", "Conv"),
    ],
    ids=["sin", "cos-in-second-node-shard", "activation-matmul", "conv"],
)
def test_unsupported_op_names_the_node(tmp_path: Path, build, node_name: str, op: str) -> None:
    model_dir = build(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(EncryptionError) as info:
        encrypt_model_dir(model_dir, tmp_path / "deploy", seed=1)
    message = str(info.value)
    assert repr(node_name) in message
    assert f"({op})" in message
    _assert_nothing_written(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert Manifest.load(model_dir).verify_files() == []  # the input is left untouched


def test_conv_node_shard_fed_directly_by_the_head_is_refused(tmp_path: Path) -> None:
    """A node shard made only of ops the scheme has no rule for (here a Conv that reads the
    head's output directly) must not be 'encrypted' by shipping it, and its input, in
    plaintext: encrypt_model_dir has to refuse it, naming the Conv node."""
    rng = np.random.default_rng(5)
    head, tail, inits = _head_and_tail(rng)
    body = [helper.make_node("Conv", ["h0", "K"], ["hz"], name="body/only_conv", pads=[1, 1])]
    inits += [_weight(rng, "K", W, W, 3)]
    model_dir = _import(head + body + tail, inits, ["h0", "hz"], tmp_path,
                        x_shape=("batch", W, W), y_shape=("batch", W, W))
    with pytest.raises(EncryptionError, match=r"body/only_conv"):
        encrypt_model_dir(model_dir, tmp_path / "deploy", seed=1)
    _assert_nothing_written(tmp_path)


def test_node_shard_starting_with_relu_is_not_shipped_in_plaintext(tmp_path: Path) -> None:
    """Cut an MLP at pre-activation tensors, so each node shard starts with Relu. Whatever
    encrypt_model_dir does, it must not write a deployment whose node shards (and the
    activations sent to them) are the plaintext ones: it either refuses or encrypts them."""
    rng = np.random.default_rng(9)
    mk = helper.make_node
    nodes, inits = [], []
    prev = "x"
    for i in range(4):
        out = "y" if i == 3 else f"r{i}"
        nodes += [mk("MatMul", [prev, f"W{i}"], [f"m{i}"], name=f"l{i}/mm"),
                  mk("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"l{i}/add"),
                  mk("Relu", [f"a{i}"], [out], name=f"l{i}/relu")]
        inits += [_weight(rng, f"W{i}", W, W), _weight(rng, f"b{i}", W)]
        prev = out
    model_dir = _import(nodes, inits, ["a0", "a1", "a2"], tmp_path)
    try:
        deployment = encrypt_model_dir(model_dir, tmp_path / "deploy", seed=1)
    except EncryptionError:
        _assert_nothing_written(tmp_path)
        return
    plain = Manifest.load(model_dir)
    for plain_spec, enc_spec in zip(plain.node_shards, deployment.node_shards, strict=True):
        assert enc_spec.cid != plain_spec.cid, f"node shard {enc_spec.index} is plaintext"
    x = np.random.default_rng(10).standard_normal((4, W)).astype(np.float32)
    plain_env, enc_env = _run_all(model_dir, {"x": x}), _run_all(tmp_path / "deploy", {"x": x})
    for name in ("a0", "a1", "a2"):
        assert not np.allclose(enc_env[name], plain_env[name]), f"{name} is sent in plaintext"


# --- bad model directories -----------------------------------------------------------------------


def test_already_encrypted_deployment(deployment_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="already encrypted"):
        encrypt_model_dir(deployment_dir, tmp_path / "deploy2", seed=1)
    _assert_nothing_written(tmp_path, "deploy2")


def test_tampered_shard(minilm_dir: Path, tmp_path: Path) -> None:
    copy_dir = tmp_path / "model"
    shutil.copytree(minilm_dir, copy_dir)
    manifest = Manifest.load(copy_dir)
    victim = copy_dir / manifest.node_shards[0].path
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"shard 1.*hashes to"):
        encrypt_model_dir(copy_dir, tmp_path / "deploy", seed=1)
    _assert_nothing_written(tmp_path)


def test_not_a_model_dir(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no such manifest"):
        encrypt_model_dir(tmp_path / "empty", tmp_path / "deploy", seed=1)
    _assert_nothing_written(tmp_path)


# --- a user MLP the scheme covers ----------------------------------------------------------------


def _post_ln_block(rng: np.random.Generator, i: int, src: str, dst: str
                   ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """dst = LayerNorm(src + (Relu(src W1 + b1) W2 + b2))"""
    mk = helper.make_node
    p = f"blk{i}"
    nodes = [
        mk("MatMul", [src, f"{p}.W1"], [f"{p}/mm1"], name=f"{p}/mm1"),
        mk("Add", [f"{p}/mm1", f"{p}.b1"], [f"{p}/add1"], name=f"{p}/add1"),
        mk("Relu", [f"{p}/add1"], [f"{p}/relu"], name=f"{p}/relu"),
        mk("MatMul", [f"{p}/relu", f"{p}.W2"], [f"{p}/mm2"], name=f"{p}/mm2"),
        mk("Add", [f"{p}/mm2", f"{p}.b2"], [f"{p}/add2"], name=f"{p}/add2"),
        mk("Add", [f"{p}/add2", src], [f"{p}/res"], name=f"{p}/res"),
        mk("LayerNormalization", [f"{p}/res", f"{p}.g", f"{p}.beta"], [dst], name=f"{p}/ln",
           axis=-1, epsilon=1e-5),
    ]
    gamma = numpy_helper.from_array((1 + 0.1 * rng.standard_normal(W)).astype(np.float32),
                                    f"{p}.g")
    inits = [_weight(rng, f"{p}.W1", W, W), _weight(rng, f"{p}.b1", W),
             _weight(rng, f"{p}.W2", W, W), _weight(rng, f"{p}.b2", W), gamma,
             _weight(rng, f"{p}.beta", W)]
    return nodes, inits


def _mlp_ln_model(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(6)
    head, tail, inits = _head_and_tail(rng)
    n1, i1 = _post_ln_block(rng, 1, "h0", "h1")
    n2, i2 = _post_ln_block(rng, 2, "h1", "hz")
    model_dir = _import(head + n1 + n2 + tail, inits + i1 + i2, ["h0", "h1", "hz"], tmp_path,
                        x_shape=("batch", "seq", W), y_shape=("batch", "seq", W))
    return tmp_path / "user.onnx", model_dir


def test_user_mlp_with_layernorm_encrypts(tmp_path: Path) -> None:
    src, model_dir = _mlp_ln_model(tmp_path)
    deploy = tmp_path / "deploy"
    deployment = encrypt_model_dir(model_dir, deploy, seed=7)
    assert deployment.encryption == "ee-encoder/1"
    assert [s.role for s in deployment.shards] == ["client-head", "node", "node", "client-tail"]

    x = np.random.default_rng(8).standard_normal((3, 5, W)).astype(np.float32)
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    expected = sess.run(["y"], {"x": x})[0]
    plain = Pipeline(model_dir).run({"x": x})["y"]
    encrypted = Pipeline(deploy).run({"x": x})["y"]
    np.testing.assert_allclose(plain, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(encrypted, expected, rtol=1e-4, atol=1e-4)

    # what a node sees differs from the plaintext activation
    plain_env = _run_all(model_dir, {"x": x})
    enc_env = _run_all(deploy, {"x": x})
    for name in ("h0", "h1", "hz"):
        assert not np.allclose(enc_env[name], plain_env[name], atol=1e-3), name

    plain_manifest = Manifest.load(model_dir)
    for plain_spec, enc_spec in zip(plain_manifest.node_shards, deployment.node_shards,
                                    strict=True):
        assert plain_spec.cid != enc_spec.cid
        plain_w = _initializers(plain_manifest.shard_path(plain_spec))
        enc_w = _initializers(deployment.shard_path(enc_spec))
        assert set(plain_w) == set(enc_w)
        for name, value in plain_w.items():
            assert enc_w[name].shape == value.shape
            assert not np.array_equal(enc_w[name], value), name
            # hidden and FFN spaces are permutations: same values, different places
            np.testing.assert_array_equal(np.sort(enc_w[name], axis=None),
                                          np.sort(value, axis=None))


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _run_all(model_dir: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    doc = json.loads((model_dir / "manifest.json").read_bytes())
    env = dict(feeds)
    for shard in doc["shards"]:
        sess = ort.InferenceSession(str(model_dir / shard["path"]),
                                    providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        env.update(zip(names, sess.run(names, {i.name: env[i.name] for i in sess.get_inputs()}),
                       strict=True))
    return env


def test_encrypt_into_nonempty_dir_leaves_it_alone(tmp_path: Path) -> None:
    _, model_dir = _mlp_ln_model(tmp_path)
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    (deploy / "keep.txt").write_text("mine")
    with pytest.raises(OutputDirError):
        encrypt_model_dir(model_dir, deploy, seed=7)
    assert sorted(p.name for p in deploy.iterdir()) == ["keep.txt"]
    assert list(tmp_path.glob(".deploy.partial-*")) == []


# --- the MiniLM deployment -----------------------------------------------------------------------


def test_deployment_layout(deployment_dir: Path, deployment_manifest: Manifest) -> None:
    shards = deployment_dir / "shards"
    client = deployment_dir / "client"
    node_files = {f"{s.cid}.onnx" for s in deployment_manifest.node_shards}
    assert {p.name for p in shards.iterdir()} == node_files
    assert not any("key" in p.name for p in shards.iterdir())
    expected_client = {f"{deployment_manifest.head.cid}.onnx",
                       f"{deployment_manifest.tail.cid}.onnx", "key.json", "tokenizer.json"}
    assert {p.name for p in client.iterdir()} == expected_client
    assert {p.name for p in deployment_dir.iterdir()} == {"manifest.json", "shards", "client"}
    assert deployment_manifest.verify_files() == []


def test_deployment_client_files_are_private(deployment_dir: Path) -> None:
    """client/ is the secret (the key is folded into the client shards): 0700, files 0600."""
    client_dir = deployment_dir / "client"
    assert stat.S_IMODE(client_dir.stat().st_mode) == 0o700
    files = list(client_dir.iterdir())
    assert {p.suffix for p in files} == {".onnx", ".json"} and len(files) == 4
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((deployment_dir / "manifest.json").stat().st_mode) & 0o044  # public


def test_deployment_node_shards_differ_from_plaintext(
        minilm_manifest: Manifest, deployment_manifest: Manifest) -> None:
    plain_nodes, enc_nodes = minilm_manifest.node_shards, deployment_manifest.node_shards
    assert len(plain_nodes) == len(enc_nodes) == 2
    plain_cids = {s.cid for s in minilm_manifest.shards}
    for plain_spec, enc_spec in zip(plain_nodes, enc_nodes, strict=True):
        assert enc_spec.cid not in plain_cids
        assert [t.name for t in enc_spec.inputs] == [t.name for t in plain_spec.inputs]
        assert [t.name for t in enc_spec.outputs] == [t.name for t in plain_spec.outputs]
        plain_w = _initializers(minilm_manifest.shard_path(plain_spec))
        enc_w = _initializers(deployment_manifest.shard_path(enc_spec))
        assert set(plain_w) == set(enc_w)
        matrices = [n for n, v in plain_w.items() if v.ndim == 2 and min(v.shape) >= 32]
        assert len(matrices) >= 18  # q, k, v, o, ffn in, ffn out per layer
        for name in matrices:
            assert enc_w[name].shape == plain_w[name].shape
            assert np.abs(enc_w[name] - plain_w[name]).max() > 1e-2, name
    # the client head and tail change too (the key is folded into them)
    assert deployment_manifest.head.cid != minilm_manifest.head.cid
    assert deployment_manifest.tail.cid != minilm_manifest.tail.cid


def test_deployment_embeddings_match_plaintext(minilm_dir: Path, deployment_dir: Path) -> None:
    texts = ["A man is eating food.", "Encrypted inference keeps activations private."]
    plain = Pipeline(minilm_dir).embed(texts)
    encrypted = Pipeline(deployment_dir).embed(texts)
    np.testing.assert_allclose(encrypted, plain, atol=1e-4)
