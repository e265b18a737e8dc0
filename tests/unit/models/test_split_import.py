"""Importing user ONNX models as U-shaped shards, checked against the unsplit model in
onnxruntime."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import (
    ImportError_,
    Manifest,
    OutputDirError,
    Pipeline,
    SplitError,
    TextTokenizer,
    import_onnx,
    split_model,
)

OPSET = 17
IR_VERSION = 9
ROLES_4 = ["client-head", "node", "node", "client-tail"]
NP_OF_ONNX = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64",
              TensorProto.DOUBLE: "float64", TensorProto.INT32: "int32"}


# --- model builders ------------------------------------------------------------------------------


def _weight(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    scale = 1.0 / np.sqrt(shape[0])
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto],
           name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _fvi(name: str, *shape: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def mlp_chain(width: int = 8, layers: int = 4, seed: int = 1) -> onnx.ModelProto:
    """x -> [MatMul, Add, Relu] x layers -> y; layer i writes h{i} (the last one writes y)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i in range(layers):
        out = "y" if i == layers - 1 else f"h{i}"
        inits += [_weight(rng, f"W{i}", width, width), _weight(rng, f"b{i}", width)]
        nodes += [
            helper.make_node("MatMul", [prev, f"W{i}"], [f"l{i}/mm"], name=f"l{i}/mm"),
            helper.make_node("Add", [f"l{i}/mm", f"b{i}"], [f"l{i}/add"], name=f"l{i}/add"),
            helper.make_node("Relu", [f"l{i}/add"], [out], name=f"l{i}/relu"),
        ]
        prev = out
    return _model(nodes, [_fvi("x", "batch", width)], [_fvi("y", "batch", width)], inits,
                  "mlp_chain")


def skip_model(width: int = 8, seed: int = 2) -> onnx.ModelProto:
    """Two inputs x, z; cuts a, m, n.

    head:  a = Relu(x W0 + b0);  s = x Ws            (s skips to the tail)
    node1: m = Relu(a W1 + b1)
    node2: n = Relu(m W2 + b2) + a                   (a skips over the cut m)
    tail:  y = (n W3 + s) * z;  aux = Sigmoid(n)     (z, a model input, is used only here)
    """
    rng = np.random.default_rng(seed)
    inits = [_weight(rng, n, width, width) for n in ("W0", "Ws", "W1", "W2", "W3")]
    inits += [_weight(rng, n, width) for n in ("b0", "b1", "b2")]
    mk = helper.make_node
    nodes = [
        mk("MatMul", ["x", "W0"], ["x0"], name="mm0"),
        mk("Add", ["x0", "b0"], ["x0b"], name="add0"),
        mk("Relu", ["x0b"], ["a"], name="relu0"),
        mk("MatMul", ["x", "Ws"], ["s"], name="mms"),
        mk("MatMul", ["a", "W1"], ["a1"], name="mm1"),
        mk("Add", ["a1", "b1"], ["a1b"], name="add1"),
        mk("Relu", ["a1b"], ["m"], name="relu1"),
        mk("MatMul", ["m", "W2"], ["m2"], name="mm2"),
        mk("Add", ["m2", "b2"], ["m2b"], name="add2"),
        mk("Relu", ["m2b"], ["m2r"], name="relu2"),
        mk("Add", ["m2r", "a"], ["n"], name="residual"),
        mk("MatMul", ["n", "W3"], ["n3"], name="mm3"),
        mk("Add", ["n3", "s"], ["n3s"], name="skip_add"),
        mk("Mul", ["n3s", "z"], ["y"], name="gate"),
        mk("Sigmoid", ["n"], ["aux"], name="aux"),
    ]
    return _model(nodes, [_fvi("x", "batch", width), _fvi("z", "batch", width)],
                  [_fvi("y", "batch", width), _fvi("aux", "batch", width)], inits, "skip_model")


def const_model(seed: int = 3) -> onnx.ModelProto:
    """Constant nodes (a scalar, a reshape target and a reshape target built by Concat of two
    Constants) used by the head, the node shard and the tail.

    head: a = Reshape(Reshape(Relu(x W0), shape4) * half, shape16)
    node: b = Reshape(Relu(Reshape(a W1, shape4)), shape16)
    tail: y = (b W2) * half
    """
    rng = np.random.default_rng(seed)
    inits = [_weight(rng, n, 16, 16) for n in ("W0", "W1", "W2")]
    mk = helper.make_node

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return mk("Constant", [], [name], name=f"const/{name}",
                  value=numpy_helper.from_array(value, name))

    nodes = [
        const("half", np.array(0.5, np.float32)),
        const("shape4", np.array([-1, 4, 4], np.int64)),
        const("neg1", np.array([-1], np.int64)),
        const("sixteen", np.array([16], np.int64)),
        mk("Concat", ["neg1", "sixteen"], ["shape16"], name="const/shape16", axis=0),
        mk("MatMul", ["x", "W0"], ["x0"], name="mm0"),
        mk("Relu", ["x0"], ["x0r"], name="relu0"),
        mk("Reshape", ["x0r", "shape4"], ["x0s"], name="reshape0"),
        mk("Mul", ["x0s", "half"], ["x0h"], name="scale0"),
        mk("Reshape", ["x0h", "shape16"], ["a"], name="flat0"),
        mk("MatMul", ["a", "W1"], ["a1"], name="mm1"),
        mk("Reshape", ["a1", "shape4"], ["a1s"], name="reshape1"),
        mk("Relu", ["a1s"], ["a1r"], name="relu1"),
        mk("Reshape", ["a1r", "shape16"], ["b"], name="flat1"),
        mk("MatMul", ["b", "W2"], ["b2"], name="mm2"),
        mk("Mul", ["b2", "half"], ["y"], name="scale2"),
    ]
    return _model(nodes, [_fvi("x", "batch", 16)], [_fvi("y", "batch", 16)], inits,
                  "const_model")


CASES = {
    "mlp": (mlp_chain, ["h0", "h1", "h2"], ["x"]),
    "skip": (skip_model, ["a", "m", "n"], ["x", "z"]),
    "const": (const_model, ["a", "b"], ["x"]),
}


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _feeds(model: onnx.ModelProto, batch: int = 5, seed: int = 11) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch
                for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _reference(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def _spec_of(vi: onnx.ValueInfoProto) -> dict[str, object]:
    tt = vi.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
             for d in tt.shape.dim]
    return {"name": vi.name, "dtype": NP_OF_ONNX[tt.elem_type], "shape": shape}


def _run_by_hand(model_dir: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the shard files in manifest order with plain onnxruntime sessions, routing tensors
    by name; only the manifest's shard order and paths are taken from veilnet."""
    doc = json.loads((model_dir / "manifest.json").read_bytes())
    env = dict(feeds)
    for shard in doc["shards"]:
        sess = ort.InferenceSession(str(model_dir / shard["path"]),
                                    providers=["CPUExecutionProvider"])
        ins = {i.name: env[i.name] for i in sess.get_inputs()}
        names = [o.name for o in sess.get_outputs()]
        env.update(zip(names, sess.run(names, ins), strict=True))
    return env


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert list(parent.glob(f".{name}.partial-*")) == []


# --- successful imports --------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_import_reproduces_unsplit_model(case: str, tmp_path: Path) -> None:
    build, cuts, input_names = CASES[case]
    model = build()
    src = _save(model, tmp_path / f"{case}.onnx")
    out = tmp_path / "out"
    manifest = import_onnx(src, cuts, out)

    roles = [s.role for s in manifest.shards]
    assert roles == ["client-head"] + ["node"] * (len(cuts) - 1) + ["client-tail"]
    assert [t.name for t in manifest.inputs] == input_names
    assert [t.name for t in manifest.outputs] == [o.name for o in model.graph.output]

    # the manifest on disk describes every shard file's real graph inputs and outputs
    doc = json.loads((out / "manifest.json").read_bytes())
    for shard in doc["shards"]:
        graph = onnx.load(str(out / shard["path"])).graph
        inits = {t.name for t in graph.initializer}
        assert shard["inputs"] == [_spec_of(v) for v in graph.input if v.name not in inits]
        assert shard["outputs"] == [_spec_of(v) for v in graph.output]

    feeds = _feeds(model)
    expected = _reference(src, feeds)
    by_pipeline = Pipeline(out).run(feeds)
    by_hand = _run_by_hand(out, feeds)
    assert set(by_pipeline) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(by_pipeline[name], value, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(by_hand[name], value, rtol=1e-6, atol=1e-6)


def _io(manifest: Manifest) -> list[tuple[list[str], list[str]]]:
    return [(sorted(t.name for t in s.inputs), sorted(t.name for t in s.outputs))
            for s in manifest.shards]


def test_mlp_chain_shard_boundaries(tmp_path: Path) -> None:
    src = _save(mlp_chain(), tmp_path / "mlp.onnx")
    manifest = import_onnx(src, ["h0", "h1", "h2"], tmp_path / "out")
    assert _io(manifest) == [(["x"], ["h0"]), (["h0"], ["h1"]), (["h1"], ["h2"]), (["h2"], ["y"])]
    for shard in manifest.shards:
        graph = onnx.load(str(manifest.shard_path(shard))).graph
        assert len(graph.node) == 3  # one MatMul+Add+Relu layer each
        assert len(graph.initializer) == 2


def roles_of(manifest: Manifest) -> list[str]:
    return [s.role for s in manifest.shards]


def test_skip_connections_cross_cuts(tmp_path: Path) -> None:
    src = _save(skip_model(), tmp_path / "skip.onnx")
    manifest = import_onnx(src, ["a", "m", "n"], tmp_path / "out")
    assert roles_of(manifest) == ROLES_4
    assert _io(manifest) == [
        (["x"], ["a", "s"]),  # the head also computes s, which only the tail reads
        (["a"], ["m"]),
        (["a", "m"], ["n"]),  # the residual a crosses the cut m
        (["n", "s", "z"], ["aux", "y"]),  # z is a model input used only by the tail
    ]


def test_constants_are_copied_into_every_shard_that_uses_them(tmp_path: Path) -> None:
    src = _save(const_model(), tmp_path / "const.onnx")
    manifest = import_onnx(src, ["a", "b"], tmp_path / "out")
    assert _io(manifest) == [(["x"], ["a"]), (["a"], ["b"]), (["b"], ["y"])]
    const_names = {"half", "shape4", "neg1", "sixteen", "shape16"}
    produced = []
    for shard in manifest.shards:
        graph = onnx.load(str(manifest.shard_path(shard))).graph
        outs = {o for n in graph.node for o in n.output}
        reads = {i for n in graph.node for i in n.input}
        # every constant a shard reads is computed inside that shard, never shipped
        assert not const_names & {v.name for v in graph.input}
        assert (reads & const_names) <= outs
        produced.append(outs & const_names)
    assert produced == [
        {"half", "shape4", "neg1", "sixteen", "shape16"},
        {"shape4", "neg1", "sixteen", "shape16"},
        {"half"},
    ]


def test_import_records_source_file_cid(tmp_path: Path) -> None:
    src = _save(mlp_chain(), tmp_path / "mlp.onnx")
    manifest = import_onnx(src, ["h0", "h1", "h2"], tmp_path / "out")
    digest = hashlib.sha256(src.read_bytes()).digest()
    cid = "b" + base64.b32encode(b"\x01\x55\x12\x20" + digest).decode().lower().rstrip("=")
    assert manifest.extra["source"] == {"file": "mlp.onnx", "cid": cid}
    assert manifest.name == "mlp_chain"


# --- import errors -------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    src = tmp_path / "nope.onnx"
    with pytest.raises(ImportError_, match=r"nope\.onnx.*no such file"):
        import_onnx(src, ["h0", "h1"], tmp_path / "out")
    _no_leftovers(tmp_path, "out")


def test_random_bytes(tmp_path: Path) -> None:
    src = tmp_path / "random.onnx"
    src.write_bytes(np.random.default_rng(5).bytes(2048))
    with pytest.raises(ImportError_, match=r"random\.onnx.*not an ONNX model"):
        import_onnx(src, ["h0", "h1"], tmp_path / "out")
    _no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_truncated_model(tmp_path: Path, fraction: float) -> None:
    data = mlp_chain().SerializeToString()
    src = tmp_path / "truncated.onnx"
    src.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ImportError_, match=r"truncated\.onnx"):
        import_onnx(src, ["h0", "h1"], tmp_path / "out")
    _no_leftovers(tmp_path, "out")


def test_unknown_custom_op(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Frobnicate", ["h"], ["g"], name="frob", domain="com.example.custom"),
        helper.make_node("Relu", ["g"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "custom", [_fvi("x", "batch", 4)], [_fvi("y", "batch", 4)],
                              [_weight(rng, "W", 4, 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.example.custom", 1)])
    model.ir_version = IR_VERSION
    src = _save(model, tmp_path / "custom.onnx")
    with pytest.raises(ImportError_, match=r"custom\.onnx.*Frobnicate"):
        import_onnx(src, ["h", "g"], tmp_path / "out")
    _no_leftovers(tmp_path, "out")


@pytest.mark.parametrize(
    ("cuts", "pattern"),
    [
        (["h0", "nope", "h2"], r"'nope'"),
        (["x", "h1"], r"'x' is a model input"),
        (["h0", "y"], r"'y' is a model output"),
        (["h1"], r"at least two cut tensors"),
        ([], r"at least two cut tensors"),
        (["h2", "h1", "h0"], r"'h2' depends on a later cut"),
        (["h1", "h0"], r"'h1' depends on a later cut"),
        (["h0", "h0"], r"distinct"),
    ],
    ids=["unknown", "model-input", "model-output", "one-cut", "no-cuts", "reversed-3",
         "reversed-2", "duplicate"],
)
def test_bad_cuts(tmp_path: Path, cuts: list[str], pattern: str) -> None:
    src = _save(mlp_chain(), tmp_path / "mlp.onnx")
    with pytest.raises(SplitError, match=pattern):
        import_onnx(src, cuts, tmp_path / "out")
    _no_leftovers(tmp_path, "out")


def test_existing_nonempty_output_dir(tmp_path: Path) -> None:
    src = _save(mlp_chain(), tmp_path / "mlp.onnx")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputDirError, match=r"out.*not empty"):
        import_onnx(src, ["h0", "h1", "h2"], out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert list(tmp_path.glob(".out.partial-*")) == []


def test_existing_output_file(tmp_path: Path) -> None:
    src = _save(mlp_chain(), tmp_path / "mlp.onnx")
    out = tmp_path / "out"
    out.write_text("a file, not a directory")
    with pytest.raises(OutputDirError):
        import_onnx(src, ["h0", "h1", "h2"], out)
    assert out.read_text() == "a file, not a directory"
    assert list(tmp_path.glob(".out.partial-*")) == []


def test_existing_empty_output_dir_is_used(tmp_path: Path) -> None:
    src = _save(mlp_chain(), tmp_path / "mlp.onnx")
    out = tmp_path / "out"
    out.mkdir()
    manifest = import_onnx(src, ["h0", "h1", "h2"], out)
    assert manifest.path == out / "manifest.json"
    assert Manifest.load(out).verify_files() == []
    assert list(tmp_path.glob(".out.partial-*")) == []


# --- the real MiniLM graph ------------------------------------------------------------------------


def test_split_minilm_matches_unsplit(minilm_model: onnx.ModelProto, minilm_dir: Path) -> None:
    cuts = ["hidden_0", "hidden_2", "hidden_4", "hidden_6"]
    shards = split_model(minilm_model, cuts)
    assert len(shards) == len(cuts) + 1
    tok = TextTokenizer(minilm_dir / "tokenizer.json", 256)
    texts = ["A man is eating food.", "x", "Encrypted inference keeps activations private, "
             "even across several untrusted peers on the network."]
    feeds = tok(texts)
    whole = ort.InferenceSession(minilm_model.SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    expected = whole.run(None, feeds)[0]

    env = dict(feeds)
    for k, shard in enumerate(shards):
        sess = ort.InferenceSession(shard.model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == shard.inputs
        assert [o.name for o in sess.get_outputs()] == shard.outputs
        if 0 < k < len(shards) - 1:  # node shards take the previous cut, never raw inputs
            assert cuts[k - 1] in shard.inputs
            assert cuts[k] in shard.outputs
            assert not {"input_ids", "attention_mask", "token_type_ids"} & set(shard.inputs)
        env.update(zip(shard.outputs, sess.run(shard.outputs,
                                               {n: env[n] for n in shard.inputs}), strict=True))
    got = env[minilm_model.graph.output[0].name]
    assert got.shape == (len(texts), 384)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
