"""``ee-decoder/1``: equivariant encryption of the shards of a llama-style decoder
(models/llama_graph.py: pre-RMSNorm, RoPE in rotate_half layout, grouped-query attention with a
KV cache, SwiGLU), exact up to float rounding.

With row vectors and weights stored ``[in, out]`` (``blk.{i}.<name>.weight.T``), for node shard
``s`` with secret orthogonal ``Q`` and each of its layers (key: models/ee_decoder_key.py):

- RMSNorm weights are folded into the projections that read them (``W <- diag(g) W``) and become
  ones. The residual stream is rotated, ``x' = x Q``; ``rms(x Q) = rms(x)``, so every projection
  reading the stream gets ``Q^T`` on its input side, ``attn_output`` and ``ffn_down`` get ``Q``
  on their output side.
- FFN: channel permutation on gate/up/down, nonzero per-channel scale on up undone in down.
- Attention: KV heads permuted (their query groups move with them), query heads permuted within a
  group; per KV head a complex factor ``c`` per RoPE pair (dims ``p``, ``p + head_dim/2``) on the
  queries and ``1/conj(c)`` on the keys (commutes with RoPE, keeps ``q.k``); an invertible ``S``
  on the values and ``S^-1`` on the output projection rows of the group's query heads. The KV
  cache a node keeps is in this transformed form.
- Client shards: the head's embedding table becomes ``E Q_1``; between node shards ``s`` and
  ``s+1`` a new ``client`` shard re-bases the stream (``MatMul`` by ``Q_s^T Q_{s+1}``, output
  ``<stream>.rebased``, which the next node shard reads), so no node sees two bases; the tail's
  LM head table becomes ``E diag(g_out) Q_K`` (its own untied copy) and its norm weight ones.

Node shards keep their structure and tensor names (the re-based stream input excepted); only
weights change. A graph that does not have this structure is refused before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.ee_decoder_key import DecoderDims, DecoderKey, LayerKey
from models.ee_plan import EncryptionError
from models.manifest import Manifest, ShardSpec, TensorSpec
from models.progress import counted

REBASED = "{}.rebased"  # name of a re-based stream tensor
LAYER_WEIGHTS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down")
_WEIGHT = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight(\.T)?$")
_STREAM_READERS = {"Pow", "Div", "Add", "Shape"}  # RMSNorm, residual add, sequence length
OPSET, IR_VERSION = 20, 9


@dataclass
class PlannedShard:
    """One shard of the deployment to write: its role, graph and boundary tensors."""

    role: str
    model: onnx.ModelProto
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def weight_name(layer: int, kind: str) -> str:
    return f"blk.{layer}.{kind}.weight" + ("" if kind.endswith("_norm") else ".T")


def rope_matrix(factor: np.ndarray) -> np.ndarray:
    """Real ``[head_dim, head_dim]`` ``M`` with ``t @ M`` = ``t`` times ``factor[p]`` on each
    rotate_half pair ``p`` (``t_p + i t_{p+half}``)."""
    half = factor.shape[0]
    idx = np.arange(half)
    m = np.zeros((2 * half, 2 * half))
    m[idx, idx] = m[idx + half, idx + half] = factor.real
    m[idx, idx + half] = factor.imag
    m[idx + half, idx] = -factor.imag
    return m


def encrypt_layer(w: dict[str, np.ndarray], lk: LayerKey, rotation: np.ndarray,
                  dims: DecoderDims) -> dict[str, np.ndarray]:
    """One layer's plaintext weights (kinds of ``LAYER_WEIGHTS``, stored ``[in, out]``) ->
    encrypted float32 weights."""
    hd, group = dims.head_dim, dims.group
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}

    def fold(kind: str, norm: str) -> np.ndarray:  # Q^T diag(g) W
        return rotation.T @ (w[norm][:, None] * w[kind])

    def cols(m: np.ndarray, h: int) -> np.ndarray:
        return m[:, h * hd:(h + 1) * hd]

    heads = lk.query_heads(dims)
    q, k, v = fold("attn_q", "attn_norm"), fold("attn_k", "attn_norm"), fold("attn_v",
                                                                             "attn_norm")
    inv_mix = np.linalg.inv(lk.value_mix)
    out = {
        "attn_q": np.concatenate([cols(q, h) @ rope_matrix(lk.rope_factor[s // group])
                                  for s, h in enumerate(heads)], axis=1),
        "attn_k": np.concatenate([cols(k, h) @ rope_matrix(1 / np.conj(lk.rope_factor[j]))
                                  for j, h in enumerate(lk.kv_perm)], axis=1),
        "attn_v": np.concatenate([cols(v, h) @ lk.value_mix[j]
                                  for j, h in enumerate(lk.kv_perm)], axis=1),
        "attn_output": np.concatenate([inv_mix[s // group] @ w["attn_output"][h * hd:(h + 1) * hd]
                                       for s, h in enumerate(heads)], axis=0) @ rotation,
        "ffn_gate": fold("ffn_gate", "ffn_norm")[:, lk.ffn_perm],
        "ffn_up": fold("ffn_up", "ffn_norm")[:, lk.ffn_perm] * lk.ffn_scale,
        "ffn_down": (w["ffn_down"][lk.ffn_perm] / lk.ffn_scale[:, None]) @ rotation,
        "attn_norm": np.ones_like(w["attn_norm"]),
        "ffn_norm": np.ones_like(w["ffn_norm"]),
    }
    return {kind: value.astype(np.float32) for kind, value in out.items()}


# --- graph checks and surgery --------------------------------------------------------------------

def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for pos, name in enumerate(node.input):
            out.setdefault(name, []).append((node, pos))
    return out


def _only_use(graph: onnx.GraphProto, name: str, op: str, pos: int, where: str) -> onnx.NodeProto:
    uses = _consumers(graph).get(name, [])
    if len(uses) != 1 or uses[0][0].op_type != op or uses[0][1] != pos:
        found = [(n.op_type, n.name, p) for n, p in uses]
        raise EncryptionError(f"{where}: {name!r} must be read once, as input {pos} of a {op} "
                              f"(the llama decoder graph), but is read by {found}")
    return uses[0][0]


def _set_initializers(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in values:
            new = np.ascontiguousarray(values[tensor.name], dtype=np.float32)
            tensor.CopyFrom(numpy_helper.from_array(new, tensor.name))
    return out


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def node_shard_layers(spec: ShardSpec, model: onnx.ModelProto) -> tuple[str, list[int]]:
    """The stream tensor a node shard reads and its layers; EncryptionError if the shard is not
    made of whole llama decoder layers ee-decoder/1 knows how to transform."""
    where = f"node shard {spec.index}"
    streams = [t.name for t in spec.inputs if not t.name.startswith("past_")]
    layers = sorted(int(t.name.rsplit("_", 1)[1]) for t in spec.inputs
                    if t.name.startswith("past_key_"))
    if len(streams) != 1 or not layers:
        raise EncryptionError(f"{where} must read one residual stream tensor and the past keys "
                              f"and values of its layers; it reads {[t.name for t in spec.inputs]}")
    graph = model.graph
    for node, _ in _consumers(graph).get(streams[0], []):
        if node.op_type not in _STREAM_READERS:
            raise EncryptionError(f"{where}: node {node.name!r} ({node.op_type}) reads the "
                                  f"residual stream {streams[0]!r}; ee-decoder/1 has no rule for "
                                  "it")
    names = set(_inits(model))
    for name in names:
        m = _WEIGHT.match(name)
        if m and int(m.group(1)) in layers and m.group(2) in LAYER_WEIGHTS \
                and name == weight_name(int(m.group(1)), m.group(2)):
            continue
        if any(name.startswith(f"l{i}/") for i in layers):
            continue  # the builder's per-layer constants (norm eps, RoPE tables, shapes, ...)
        raise EncryptionError(f"{where}: initializer {name!r} is not a weight of the llama "
                              "decoder layers ee-decoder/1 transforms")
    for i in layers:
        for kind in LAYER_WEIGHTS:
            name = weight_name(i, kind)
            if name not in names:
                raise EncryptionError(f"{where}: layer {i} has no {name!r}")
            norm = kind.endswith("_norm")
            _only_use(graph, name, "Mul" if norm else "MatMul", 1, where)
    return streams[0], layers


def encrypt_node_shard(model: onnx.ModelProto, layers: list[int], key: DecoderKey,
                       index: int) -> onnx.ModelProto:
    rotation = key.shard(index).rotation
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    new: dict[str, np.ndarray] = {}
    for i in layers:
        plain = {kind: tensors[weight_name(i, kind)] for kind in LAYER_WEIGHTS}
        enc = encrypt_layer(plain, key.layers[i], rotation, key.dims)
        new.update({weight_name(i, kind): value for kind, value in enc.items()})
    return _set_initializers(model, new)


def _rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    for inp in model.graph.input:
        if inp.name == old:
            inp.name = new
    for node in model.graph.node:
        for pos, name in enumerate(node.input):
            if name == old:
                node.input[pos] = new


def encrypt_head(model: onnx.ModelProto, stream: str, rotation: np.ndarray) -> onnx.ModelProto:
    """The embedding table becomes ``E Q_1``."""
    where = "client head"
    producers = [n for n in model.graph.node if stream in n.output]
    if [o.name for o in model.graph.output] != [stream] or len(producers) != 1 \
            or producers[0].op_type != "Gather":
        raise EncryptionError(f"{where} must end in one Gather of the embedding table giving "
                              f"{stream!r}")
    table = producers[0].input[0]
    if table not in _inits(model):
        raise EncryptionError(f"{where}: the embedding table {table!r} is not an initializer")
    _only_use(model.graph, table, "Gather", 0, where)
    e = numpy_helper.to_array(_inits(model)[table]).astype(np.float64)
    return _set_initializers(model, {table: e @ rotation})


def encrypt_tail(model: onnx.ModelProto, stream: str, rotation: np.ndarray) -> onnx.ModelProto:
    """Fold the final norm weight and the undoing of ``Q_K`` into the LM head table."""
    where = "client tail"
    inits = _inits(model)
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    norms = [n for n in model.graph.node if n.op_type == "Mul" and n.input[1] in inits]
    if [i.name for i in model.graph.input] != [stream] or len(gemms) != 1 or len(norms) != 1:
        raise EncryptionError(f"{where} must read {stream!r} and hold one RMSNorm and one Gemm "
                              "(the LM head)")
    table, norm = gemms[0].input[1], norms[0].input[1]
    trans_b = [a.i for a in gemms[0].attribute if a.name == "transB"]
    if table not in inits or trans_b != [1]:
        raise EncryptionError(f"{where}: the LM head must be a Gemm with transB on an "
                              "initializer [vocab, d]")
    _only_use(model.graph, table, "Gemm", 1, where)
    _only_use(model.graph, norm, "Mul", 1, where)
    g = numpy_helper.to_array(inits[norm]).astype(np.float64)
    e = numpy_helper.to_array(inits[table]).astype(np.float64)
    return _set_initializers(model, {table: (e * g[None, :]) @ rotation,
                                     norm: np.ones_like(g)})


def rebase_shard(stream: TensorSpec, matrix: np.ndarray) -> PlannedShard:
    """A ``client`` shard: ``<stream>.rebased = stream @ matrix``."""
    out_name = REBASED.format(stream.name)
    init = numpy_helper.from_array(np.ascontiguousarray(matrix, np.float32), "ee/rebase")
    node = helper.make_node("MatMul", [stream.name, init.name], [out_name], name="ee/rebase")
    dims = list(stream.shape)
    graph = helper.make_graph(
        [node], "ee_rebase",
        inputs=[helper.make_tensor_value_info(stream.name, TensorProto.FLOAT, dims)],
        outputs=[helper.make_tensor_value_info(out_name, TensorProto.FLOAT, dims)],
        initializer=[init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="veilnet")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return PlannedShard("client", model, (stream,),
                        (TensorSpec(out_name, stream.dtype, stream.shape),))


def encrypt_decoder(manifest: Manifest, seed: bytes | int | None,
                    progress: Callable[[str], None]) -> tuple[list[PlannedShard], DecoderKey]:
    """Every shard of the ee-decoder/1 deployment of ``manifest`` (a plaintext llama-decoder
    model directory), in order, and its key. Nothing is written here."""
    try:
        dims = DecoderDims.from_config(manifest.extra["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EncryptionError(f"{manifest.path}: config lacks the decoder sizes ee-decoder/1 "
                              f"needs ({exc})") from exc
    if min(dims.n_heads, dims.n_kv_heads, dims.head_dim) < 1 \
            or dims.n_heads % dims.n_kv_heads or dims.head_dim % 2:
        raise EncryptionError(f"{manifest.path}: config has {dims.n_heads} heads, "
                              f"{dims.n_kv_heads} KV heads of {dims.head_dim}")
    nodes = manifest.node_shards
    if [s.role for s in manifest.shards] != ["client-head", *["node"] * len(nodes),
                                             "client-tail"]:
        raise EncryptionError(f"{manifest.path}: expected client-head, node shards, "
                              "client-tail")
    models = {s.index: onnx.load(str(manifest.shard_path(s))) for s in manifest.shards}
    streams, layer_lists = [], []
    for s in nodes:
        stream, layers = node_shard_layers(s, models[s.index])
        streams.append(stream)
        layer_lists.append(layers)
    outputs = [*streams[1:], manifest.tail.inputs[0].name]
    for s, out in zip(nodes, outputs, strict=True):
        if out not in {t.name for t in s.outputs}:
            raise EncryptionError(f"node shard {s.index} must give {out!r}, the stream the "
                                  "next shard reads")
    # deployment order: head, node, client, node, ..., client, node, tail
    indices = [1 + 2 * k for k in range(len(nodes))]
    progress(f"generating key: {len(nodes)} stream rotations of {dims.d_model}, "
             f"{sum(map(len, layer_lists))} layers")
    key = DecoderKey.generate(dims, list(zip(indices, layer_lists, strict=True)), seed=seed)
    rotations = [key.shard(i).rotation for i in indices]

    planned = [PlannedShard("client-head", encrypt_head(models[0], streams[0], rotations[0]),
                            manifest.head.inputs, manifest.head.outputs)]
    progress("client head transformed (embedding table E Q_1)")
    with counted(progress, "encrypting node shards", len(nodes), "shards") as done:
        for k, s in enumerate(nodes):
            model = encrypt_node_shard(models[s.index], layer_lists[k], key, indices[k])
            inputs = s.inputs
            if k > 0:
                rebase = rebase_shard(next(t for t in nodes[k - 1].outputs
                                           if t.name == streams[k]),
                                      rotations[k - 1].T @ rotations[k])
                planned.append(rebase)
                new_name = rebase.outputs[0].name
                _rename_input(model, streams[k], new_name)
                inputs = tuple(TensorSpec(new_name, t.dtype, t.shape) if t.name == streams[k]
                               else t for t in s.inputs)
            planned.append(PlannedShard("node", model, inputs, s.outputs))
            progress(f"node shard {s.index} (layers {layer_lists[k][0]}-{layer_lists[k][-1]}) "
                     "transformed")
            done.advance()
    tail = manifest.tail
    planned.append(PlannedShard("client-tail",
                                encrypt_tail(models[tail.index], tail.inputs[0].name,
                                             rotations[-1]), tail.inputs, tail.outputs))
    progress("client tail transformed (LM head folds the final norm and undoes the rotation)")
    return planned, key


__all__ = ["LAYER_WEIGHTS", "REBASED", "PlannedShard", "encrypt_decoder", "encrypt_layer",
           "node_shard_layers", "rebase_shard", "rope_matrix", "weight_name"]
