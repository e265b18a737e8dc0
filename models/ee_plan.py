"""Analyse node shards for equivariant encryption (scheme ``ee-encoder/1``).

The analysis walks each node shard's nodes in order and assigns every tensor a layout (see
``models.ee_layouts``). Each supported op has a rule that says which input layouts it accepts,
which layout its output has, and how its constant operands must be transformed. The result is a
plan: the sizes of the secret spaces, and per initializer the transform to apply. Nothing is
transformed here, so a graph the rules do not cover fails before anything is written, with an
error that names the first node that has no rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from errors import InputError
from models.ee_layouts import PLAIN, Flat, HeadPerm, Heads, Layout, Plain, head_axis_of, perm_like

HIDDEN = "hidden"
NONLINEAR = {"Gelu", "Relu", "Erf", "Tanh", "Sigmoid", "Exp", "Sqrt", "Reciprocal", "Softplus",
             "FastGelu", "BiasGelu", "Abs", "Pow", "Log"}
LINEAR_UNARY = {"Identity", "Dropout", "Neg"}
INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT8,
                 onnx.TensorProto.UINT8, onnx.TensorProto.BOOL}


class EncryptionError(InputError):
    """The graph has a node the EE scheme cannot transform."""


@dataclass(frozen=True)
class WeightOp:
    """How one initializer is transformed: ``op`` is ``matmul`` (``W' = T_in^-1 W T_out``) or
    ``last_axis`` (``c' = c T`` on the last axis)."""

    op: str
    space: str
    kind: str = "perm"
    in_space: str | None = None
    in_kind: str | None = None


@dataclass
class EEPlan:
    perm_sizes: dict[str, int] = field(default_factory=dict)
    attention_dims: dict[str, tuple[int, int]] = field(default_factory=dict)
    weight_ops: dict[int, dict[str, WeightOp]] = field(default_factory=dict)  # shard -> init -> op
    layouts: dict[int, dict[str, Layout]] = field(default_factory=dict)  # shard -> tensor -> layout
    boundary: dict[str, Layout] = field(default_factory=dict)  # tensors crossing shards


def plan_encryption(node_shards: Sequence[tuple[int, onnx.ModelProto]]) -> EEPlan:
    """Analyse the node shards in pipeline order. Their inputs produced by the client (or earlier
    node shards) get layouts from how they are used / what produced them."""
    plan = EEPlan()
    for index, model in node_shards:
        _ShardAnalysis(plan, index, model).run()
        if not plan.weight_ops.get(index):
            raise EncryptionError(f"cannot encrypt node shard {index}: none of its weights "
                                  "would change, so it would run on plaintext")
    return plan


class _ShardAnalysis:
    def __init__(self, plan: EEPlan, index: int, model: onnx.ModelProto) -> None:
        self.plan = plan
        self.index = index
        self.graph = model.graph
        inferred = shape_inference.infer_shapes(model, strict_mode=False)
        infos = (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
        self.shapes = {vi.name: _dims(vi) for vi in infos}
        self.types = {vi.name: vi.type.tensor_type.elem_type for vi in infos
                      if vi.type.HasField("tensor_type")}
        self.consts: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.init_names = set(self.consts)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            for name in node.output:
                self.producer[name] = node
        self.layout: dict[str, Layout] = {}
        self.ops = plan.weight_ops.setdefault(index, {})

    # --- driver ---------------------------------------------------------------------------------

    def run(self) -> None:
        for inp in self.graph.input:
            if inp.name in self.init_names:
                continue
            known = self.plan.boundary.get(inp.name)
            self.layout[inp.name] = known if known is not None else self._client_layout(inp.name)
        for node in self.graph.node:
            if node.op_type == "Constant":
                self._constant(node)
                continue
            out = self._rule(node)
            for name in node.output:
                if name:
                    self.layout[name] = out
        self.plan.layouts[self.index] = dict(self.layout)
        for out in self.graph.output:
            self.plan.boundary[out.name] = self.layout[out.name]

    def _client_layout(self, name: str) -> Layout:
        """A tensor the client sends is encrypted into the hidden space when the shard uses it as
        data; it stays plain only when it merely modifies computed tensors (the attention bias
        added to the scores). Plaintext float data reaching any other op is refused later."""
        for node in self.consumers.get(name, []):
            dynamic = [i for i in node.input if i and i not in self.consts]
            if node.op_type in NONLINEAR | LINEAR_UNARY | {"Softmax", "Cast",
                                                           "LayerNormalization"} \
                    or (node.op_type == "MatMul" and node.input[0] == name
                        and node.input[1] in self.consts) \
                    or (node.op_type in ("Add", "Sub", "Mul", "Div") and dynamic == [name]):
                return Flat(HIDDEN)
        return PLAIN

    def _fail(self, node: onnx.NodeProto, why: str) -> EncryptionError:
        return EncryptionError(
            f"cannot encrypt node shard {self.index}: node {node.name or node.output[0]!r} "
            f"({node.op_type}) {why}")

    def _constant(self, node: onnx.NodeProto) -> None:
        for attr in node.attribute:
            if attr.name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(attr.t)
                return
        raise self._fail(node, "is a Constant without a tensor value")

    # --- rules ----------------------------------------------------------------------------------

    def _rule(self, node: onnx.NodeProto) -> Layout:
        dyn = [(i, n) for i, n in enumerate(node.input) if n and n not in self.consts]
        lays = [self.layout[n] for _, n in dyn]
        if all(isinstance(la, Plain) for la in lays):
            floats = [n for _, n in dyn if self.types.get(n) not in INTEGER_TYPES]
            if floats:
                raise self._fail(node, f"computes on plaintext data {floats}; a node shard may "
                                 "see only masks and shapes in the clear, and this op has no "
                                 "rule to take encrypted input")
            return PLAIN  # integer shape arithmetic
        op = node.op_type
        if op == "MatMul":
            return self._matmul(node, dyn)
        if op in ("Add", "Sub", "Mul", "Div"):
            return self._binary(node, dyn)
        if op in LINEAR_UNARY or (op == "Cast" and _casts_to_float(node)):
            return lays[0]
        if op in NONLINEAR:
            if len(dyn) == 1 and perm_like(lays[0]) and self._scalar_consts(node):
                return lays[0]
            raise self._fail(node, f"is nonlinear and its input is {lays[0].describe()}; only "
                             "permutations commute with it")
        if op == "Softmax":
            if perm_like(lays[0]):
                return lays[0]
            raise self._fail(node, f"applies softmax to {lays[0].describe()}")
        if op == "LayerNormalization":
            return self._layer_norm(node, lays[0])
        if op == "Reshape":
            return self._reshape(node, lays[0])
        if op == "Transpose":
            return self._transpose(node, lays[0])
        if op in ("Shape", "Size"):
            return PLAIN
        if op == "ReduceMean":
            return self._reduce_last(node, lays[0])
        raise self._fail(node, "has no equivariant-encryption rule; ee-encoder/1 covers "
                         "BERT-style encoder layers (MatMul, Add, Mul, Softmax, "
                         "LayerNormalization, Gelu, Reshape, Transpose)")

    def _matmul(self, node: onnx.NodeProto, dyn: list[tuple[int, str]]) -> Layout:
        a, b = node.input[0], node.input[1]
        la = self.layout.get(a, PLAIN)
        if b in self.consts and len(dyn) == 1 and dyn[0][0] == 0:
            weight = self.consts[b]
            if weight.ndim != 2 or not isinstance(la, Flat):
                raise self._fail(node, f"multiplies {la.describe()} by a constant of shape "
                                 f"{weight.shape}; expected a flat activation and a 2-D weight")
            self._size(node, la, weight.shape[0])
            out = self._classify_linear(node)
            self._size(node, out, weight.shape[1])
            self._record(node, b, WeightOp("matmul", out.space, out.kind, la.space, la.kind))
            return out
        lb = self.layout.get(b, PLAIN)
        if isinstance(la, Heads) and isinstance(lb, Heads) and la.space == lb.space \
                and (la.kind, lb.kind) == ("q", "k"):
            rank = len(self.shapes.get(a) or [])
            if la.feat_axis == rank - 1 and lb.feat_axis == rank - 2 and la.head_axis == \
                    lb.head_axis < rank - 2:
                return HeadPerm(la.space, la.head_axis)
        if isinstance(la, HeadPerm) and isinstance(lb, Heads) and lb.kind == "v" \
                and la.space == lb.space:
            rank = len(self.shapes.get(b) or [])
            if lb.feat_axis == rank - 1 and la.head_axis == lb.head_axis < rank - 2:
                return Heads(lb.space, "v", lb.head_axis, lb.feat_axis)
        raise self._fail(node, f"multiplies {la.describe()} by {lb.describe()}; only q x k^T "
                         "and probabilities x v of the same attention block are supported")

    def _binary(self, node: onnx.NodeProto, dyn: list[tuple[int, str]]) -> Layout:
        op = node.op_type
        scaling = op in ("Mul", "Div")
        if len(dyn) == 2:
            (_, a), (_, b) = dyn
            la, lb = self.layout[a], self.layout[b]
            if la == lb and (op in ("Add", "Sub") or perm_like(la)):
                return la  # sums of one layout; elementwise products only under permutations
            if isinstance(la, Plain) or isinstance(lb, Plain):
                secret_name, plain_name = (a, b) if isinstance(lb, Plain) else (b, a)
                secret = self.layout[secret_name]
                if op == "Div" and plain_name == node.input[0] and not perm_like(secret):
                    raise self._fail(node, "divides by an encrypted tensor")
                if self._plain_is_harmless(secret, secret_name, plain_name, scaling):
                    return secret
            raise self._fail(node, f"combines {la.describe()} with {lb.describe()}")
        (pos, name), = dyn
        lay = self.layout[name]
        const_name = node.input[1 - pos]
        value = self.consts[const_name]
        if value.size == 1:
            # x*c and x/c commute with every linear map; x+c and c/x only with permutations
            if op == "Mul" or (op == "Div" and pos == 0) or perm_like(lay):
                return lay
            raise self._fail(node, f"applies a scalar {op} to {lay.describe()}; mixing does not "
                             "commute with it")
        if isinstance(lay, Flat) and all(d == 1 for d in value.shape[:-1]) and (
                lay.kind == "perm" or op in ("Add", "Sub")):
            # a per-feature constant: permuted under a permutation, mapped through T as a bias
            self._size(node, lay, value.shape[-1])
            self._record(node, const_name, WeightOp("last_axis", lay.space, lay.kind))
            return lay
        if isinstance(lay, HeadPerm):
            rank = len(self.shapes.get(name) or [])
            aligned = lay.head_axis - (rank - value.ndim)
            if aligned < 0 or value.shape[aligned] == 1:
                return lay
        raise self._fail(node, f"combines {lay.describe()} with a constant of shape "
                         f"{value.shape} that the scheme cannot transform")

    def _plain_is_harmless(self, lay: Layout, secret_name: str, plain_name: str,
                           scaling: bool) -> bool:
        """A plaintext operand is harmless if it is constant along every secret axis; then it
        commutes with permutations, and as a scale factor also with mixing."""
        plain, full = self.shapes.get(plain_name), self.shapes.get(secret_name)
        if plain is None or full is None:
            return False
        offset = len(full) - len(plain)
        if isinstance(lay, Flat):
            axes = [len(full) - 1]
        else:
            axes = [head_axis_of(lay)] + ([lay.feat_axis] if isinstance(lay, Heads) else [])
        for axis in axes:
            aligned = axis - offset
            if aligned >= 0 and plain[aligned] != 1:
                return False
        return scaling or perm_like(lay)

    def _layer_norm(self, node: onnx.NodeProto, lay: Layout) -> Layout:
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        rank = len(self.shapes.get(node.input[0]) or [])
        if not (isinstance(lay, Flat) and lay.kind == "perm" and axis in (-1, rank - 1)):
            raise self._fail(node, f"normalises {lay.describe()} (axis {axis}); only a "
                             "permuted last axis is supported")
        if any(o for o in node.output[1:]):
            raise self._fail(node, "exposes its mean/inverse-std outputs")
        for name in node.input[1:3]:
            if name:
                if name not in self.consts:
                    raise self._fail(node, f"has a non-constant scale/bias {name!r}")
                self._size(node, lay, self.consts[name].shape[-1])
                self._record(node, name, WeightOp("last_axis", lay.space, "perm"))
        return lay

    def _reshape(self, node: onnx.NodeProto, lay: Layout) -> Layout:
        target = self.consts.get(node.input[1])
        if target is None:
            raise self._fail(node, "reshapes an encrypted tensor to a shape that is not constant")
        target = [int(v) for v in target]
        if isinstance(lay, Flat) and lay.kind in ("q", "k", "v") and len(target) == 4 \
                and target[2] > 0 and target[3] > 0:
            self._attention_dims(node, lay.space, target[2], target[3])
            return Heads(lay.space, lay.kind, 2, 3)
        if isinstance(lay, Heads) and len(target) == 3 and lay.head_axis == 2 \
                and lay.feat_axis == 3:
            return Flat(lay.space, lay.kind)
        raise self._fail(node, f"reshapes {lay.describe()} to {target}")

    def _transpose(self, node: onnx.NodeProto, lay: Layout) -> Layout:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if perm is None:
            raise self._fail(node, "has no explicit perm")
        if isinstance(lay, Heads):
            return Heads(lay.space, lay.kind, perm.index(lay.head_axis),
                         perm.index(lay.feat_axis))
        if isinstance(lay, HeadPerm):
            return HeadPerm(lay.space, perm.index(lay.head_axis))
        if isinstance(lay, Flat) and perm[-1] == len(perm) - 1:
            return lay
        raise self._fail(node, f"moves the secret axis of {lay.describe()}")

    def _reduce_last(self, node: onnx.NodeProto, lay: Layout) -> Layout:
        axes = self.consts.get(node.input[1]) if len(node.input) > 1 else None
        rank = len(self.shapes.get(node.input[0]) or [])
        if isinstance(lay, Flat) and lay.kind == "perm" and axes is not None and \
                [int(a) % max(rank, 1) for a in np.ravel(axes)] == [rank - 1]:
            return PLAIN  # a mean over a permuted axis is the plaintext mean
        raise self._fail(node, f"reduces {lay.describe()} over axes other than the secret one")

    # --- helpers --------------------------------------------------------------------------------

    def _classify_linear(self, node: onnx.NodeProto) -> Flat:
        """Decide which space a linear layer writes into, from how its output is used."""
        name = node.output[0]
        while True:
            users = self.consumers.get(name, [])
            if len(users) == 1 and (users[0].op_type in ("Reshape", "Transpose") or (
                    users[0].op_type == "Add" and any(i in self.consts for i in users[0].input))):
                name = users[0].output[0]
                continue
            break
        if any(u.op_type in NONLINEAR or any(
                v.op_type in NONLINEAR for o in u.output for v in self.consumers.get(o, []))
               for u in users if u.op_type not in ("Add", "MatMul")):
            return Flat(f"ffn/{self.index}/{node.name or node.output[0]}")
        if len(users) == 1 and users[0].op_type == "MatMul":
            user = users[0]
            if user.input[0] == name:
                return Flat(self._block_id(user), "q")
            scores = self._scores_behind(user.input[0])
            if scores is not None:
                return Flat(self._block_id(scores), "v")
            return Flat(self._block_id(user), "k")
        return Flat(HIDDEN)

    def _scores_behind(self, name: str) -> onnx.NodeProto | None:
        """Walk back from attention probabilities through softmax to the q x k^T MatMul."""
        seen_softmax = False
        node = self.producer.get(name)
        while node is not None:
            if node.op_type == "Softmax":
                seen_softmax = True
            elif node.op_type == "MatMul":
                return node if seen_softmax else None
            dynamic = [i for i in node.input if i and i not in self.consts
                       and i in self.producer]
            if not dynamic:
                return None
            node = self.producer[dynamic[0]]
        return None

    def _block_id(self, scores: onnx.NodeProto) -> str:
        return f"attn/{self.index}/{scores.name or scores.output[0]}"

    def _size(self, node: onnx.NodeProto, lay: Flat, size: int) -> None:
        if lay.kind == "perm":
            known = self.plan.perm_sizes.setdefault(lay.space, size)
            if known != size:
                raise self._fail(node, f"needs space {lay.space!r} of size {size}, but it has "
                                 f"size {known} elsewhere")

    def _attention_dims(self, node: onnx.NodeProto, space: str, heads: int, dim: int) -> None:
        known = self.plan.attention_dims.setdefault(space, (heads, dim))
        if known != (heads, dim):
            raise self._fail(node, f"splits {space!r} into {heads}x{dim}, elsewhere {known}")

    def _record(self, node: onnx.NodeProto, init: str, op: WeightOp) -> None:
        if init not in self.init_names:
            raise self._fail(node, f"has a constant {init!r} that is not an initializer")
        previous = self.ops.setdefault(init, op)
        if previous != op:
            raise self._fail(node, f"shares initializer {init!r} with a node that needs a "
                             "different transform")

    def _scalar_consts(self, node: onnx.NodeProto) -> bool:
        return all(self.consts[i].size == 1 for i in node.input if i in self.consts)


def _casts_to_float(node: onnx.NodeProto) -> bool:
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    return to in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in vi.type.tensor_type.shape.dim]


__all__ = ["EEPlan", "EncryptionError", "WeightOp", "plan_encryption"]
