"""Apply an EE key to shards: transform node-shard weights per the plan, and fold the key into the
client head (encrypt what it sends) and tail (decrypt what it receives)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from crypto.ee_key import EEKey
from models.ee_layouts import Flat, Layout, Plain
from models.ee_plan import EncryptionError, WeightOp


def encrypt_node_shard(model: onnx.ModelProto, ops: dict[str, WeightOp],
                       key: EEKey) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        op = ops.get(tensor.name)
        if op is None:
            continue
        value = numpy_helper.to_array(tensor)
        new = _transform(value, op, key).astype(value.dtype)
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), tensor.name))
    return out


def _transform(value: np.ndarray, op: WeightOp, key: EEKey) -> np.ndarray:
    if op.op == "matmul":
        assert op.in_space is not None and op.in_kind is not None
        w = _rows_inverse(value.astype(np.float64), op.in_space, op.in_kind, key)
        return _cols(w, op.space, op.kind, key)
    if op.op == "last_axis":
        return _cols(value.astype(np.float64), op.space, op.kind, key)
    raise ValueError(f"unknown weight op {op.op!r}")


def _cols(w: np.ndarray, space: str, kind: str, key: EEKey) -> np.ndarray:
    """``w @ T`` over the last axis."""
    if kind == "perm":
        return w[..., key.perm(space).perm]
    return w @ key.attention(space).matrix(kind)


def _rows_inverse(w: np.ndarray, space: str, kind: str, key: EEKey) -> np.ndarray:
    """``T^-1 @ w`` over the first axis."""
    if kind == "perm":
        return w[key.perm(space).perm, :]
    return key.attention(space).inverse_matrix(kind) @ w


def _gather_node(key: EEKey, space: str, inverse: bool, src: str, dst: str
                 ) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    perm_space = key.perm(space)
    index = perm_space.inverse if inverse else perm_space.perm
    name = f"ee/{'decrypt' if inverse else 'encrypt'}/{dst}"
    init = numpy_helper.from_array(index.astype(np.int64), f"{name}/index")
    node = helper.make_node("Gather", [src, init.name], [dst], name=name, axis=-1)
    return node, init


def _client_space(lay: Layout | None, what: str, name: str) -> str | None:
    """The permutation space a client shard translates ``name`` through, or None if plain."""
    if lay is None or isinstance(lay, Plain):
        return None
    if isinstance(lay, Flat) and lay.kind == "perm":
        return lay.space
    raise EncryptionError(f"client {what} {name!r} would be in layout {lay.describe()}, "
                          "which a client shard cannot translate")


def fold_into_head(model: onnx.ModelProto, layouts: dict[str, Layout],
                   key: EEKey) -> onnx.ModelProto:
    """Append ``Gather(perm)`` to every head output that node shards read in a secret space."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for output in graph.output:
        space = _client_space(layouts.get(output.name), "head output", output.name)
        if space is None:
            continue
        plain_name = f"{output.name}/plain"
        _rename_output(graph, output.name, plain_name)
        node, init = _gather_node(key, space, inverse=False, src=plain_name, dst=output.name)
        graph.node.append(node)
        graph.initializer.append(init)
    return out


def fold_into_tail(model: onnx.ModelProto, layouts: dict[str, Layout],
                   key: EEKey) -> onnx.ModelProto:
    """Prepend ``Gather(inverse perm)`` to every tail input that arrives in a secret space."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    prologue = []
    for inp in graph.input:
        space = _client_space(layouts.get(inp.name), "tail input", inp.name)
        if space is None:
            continue
        plain_name = f"{inp.name}/plain"
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == inp.name:
                    node.input[i] = plain_name
        node, init = _gather_node(key, space, inverse=True, src=inp.name, dst=plain_name)
        prologue.append(node)
        graph.initializer.append(init)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(prologue + rest)
    return out


def _rename_output(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


__all__ = ["encrypt_node_shard", "fold_into_head", "fold_into_tail"]
