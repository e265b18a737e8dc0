"""Split an ONNX graph at named tensors into U-shaped shards.

Given cut tensors ``c_0 .. c_{n-1}`` (in graph order) the model becomes ``n + 1`` shards:

- shard 0 (client head): every node that does not depend on any cut tensor. Besides the
  ancestors of ``c_0`` that includes input-only work such as turning the attention mask into an
  additive bias, so raw model inputs stay with the client;
- shard k (1 <= k < n): the nodes that ``c_k`` needs and no earlier shard computed;
- shard n (client tail): everything else.

Nodes that depend on no graph input at all (constants, shape constants) are copied into every
shard that uses them, so no shard has to ship a constant to another. A shard's inputs are the
tensors it reads from the model inputs or from earlier shards; its outputs are what later shards
or the model outputs read from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx
from onnx import helper, shape_inference

from errors import InputError


class SplitError(InputError):
    """Cut tensors that do not split the graph into usable shards."""


@dataclass
class Shard:
    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]


def split_model(model: onnx.ModelProto, cuts: Sequence[str]) -> list[Shard]:
    graph = model.graph
    inferred = shape_inference.infer_shapes(model, strict_mode=False)
    types = {vi.name: vi for vi in (*inferred.graph.value_info, *inferred.graph.input,
                                    *inferred.graph.output)}
    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in initializers]
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producer[out] = i

    _check_cuts(cuts, producer, graph_inputs, [o.name for o in graph.output])

    # Which nodes (transitively) read a graph input, and which read each cut tensor.
    dynamic = set(graph_inputs)
    reads_input = [False] * len(graph.node)
    depends_on: list[set[int]] = [set() for _ in graph.node]  # indices of cuts it depends on
    cut_index = {name: k for k, name in enumerate(cuts)}
    tensor_cuts: dict[str, set[int]] = {}
    for i, node in enumerate(graph.node):
        deps: set[int] = set()
        for name in node.input:
            if name in dynamic:
                reads_input[i] = True
            deps |= tensor_cuts.get(name, set())
        depends_on[i] = deps
        for out in node.output:
            if reads_input[i]:
                dynamic.add(out)
            tensor_cuts[out] = deps | ({cut_index[out]} if out in cut_index else set())
    for k, name in enumerate(cuts):
        earlier_needed = depends_on[producer[name]]
        if any(j > k for j in earlier_needed):
            raise SplitError(f"cut tensor {name!r} depends on a later cut tensor; list cuts in "
                             "graph order")

    constant_nodes = {i for i in range(len(graph.node)) if not reads_input[i]}
    assignment: dict[int, int] = {}
    for i in range(len(graph.node)):
        if i not in constant_nodes and not depends_on[i]:
            assignment[i] = 0
    for k, name in enumerate(cuts[1:], start=1):
        for i in _ancestors(graph, producer, producer[name]):
            if i not in constant_nodes and i not in assignment:
                assignment[i] = k
    last = len(cuts)
    for i in range(len(graph.node)):
        if i not in constant_nodes and i not in assignment:
            assignment[i] = last
    for k in range(last + 1):
        if k not in assignment.values():
            raise SplitError(f"shard {k} would be empty; check the order of the cut tensors")

    model_outputs = [o.name for o in graph.output]
    shards = []
    for k in range(last + 1):
        members = sorted(i for i, s in assignment.items() if s == k)
        members = _with_constants(graph, producer, members, constant_nodes)
        shards.append(_make_shard(model, k, members, assignment, producer, initializers, types,
                                  graph_inputs, model_outputs, constant_nodes))
    return shards


def _check_cuts(cuts: Sequence[str], producer: dict[str, int], inputs: list[str],
                outputs: list[str]) -> None:
    if len(cuts) < 2:
        raise SplitError("need at least two cut tensors: one ends the client head, the last "
                         "starts the client tail, and node shards lie between them")
    if len(set(cuts)) != len(cuts):
        raise SplitError("cut tensors must be distinct")
    for name in cuts:
        if name in inputs:
            raise SplitError(f"cut tensor {name!r} is a model input; cut at a computed tensor")
        if name in outputs:
            raise SplitError(f"cut tensor {name!r} is a model output; the client tail must "
                             "compute something after it")
        if name not in producer:
            known = ", ".join(sorted(producer)[:8])
            raise SplitError(f"no node produces a tensor named {name!r} (some that exist: "
                             f"{known}, ...)")


def _ancestors(graph: onnx.GraphProto, producer: dict[str, int], start: int) -> set[int]:
    seen = {start}
    stack = [start]
    while stack:
        for name in graph.node[stack.pop()].input:
            j = producer.get(name)
            if j is not None and j not in seen:
                seen.add(j)
                stack.append(j)
    return seen


def _with_constants(graph: onnx.GraphProto, producer: dict[str, int], members: list[int],
                    constant_nodes: set[int]) -> list[int]:
    needed = set(members)
    for i in members:
        for name in graph.node[i].input:
            j = producer.get(name)
            if j is not None and j in constant_nodes:
                needed |= {a for a in _ancestors(graph, producer, j) if a in constant_nodes}
    return sorted(needed)


def _make_shard(model: onnx.ModelProto, k: int, members: list[int], assignment: dict[int, int],
                producer: dict[str, int], initializers: dict[str, onnx.TensorProto],
                types: dict[str, onnx.ValueInfoProto], graph_inputs: list[str],
                model_outputs: list[str], constant_nodes: set[int]) -> Shard:
    graph = model.graph
    member_set = set(members)
    produced = {o for i in members for o in graph.node[i].output if o}
    inputs: list[str] = []
    used_inits: list[str] = []
    for i in members:
        for name in graph.node[i].input:
            if not name or name in produced:
                continue
            if name in initializers:
                if name not in used_inits:
                    used_inits.append(name)
            elif name not in inputs:
                inputs.append(name)
    later_reads = set(model_outputs)
    for i, node in enumerate(graph.node):
        if i not in member_set and i not in constant_nodes and assignment.get(i, -1) > k:
            later_reads.update(node.input)
    outputs = [o for i in members if i not in constant_nodes
               for o in graph.node[i].output if o and o in later_reads]

    def info(name: str) -> onnx.ValueInfoProto:
        if name not in types or not types[name].type.HasField("tensor_type"):
            raise SplitError(f"cannot infer the type of boundary tensor {name!r}")
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(types[name])
        for dim in vi.type.tensor_type.shape.dim:
            # shape inference names dimensions it cannot relate to an input "unk__N"; such a
            # name means nothing outside this graph, so the boundary declares it unnamed
            if dim.dim_param.startswith("unk__"):
                dim.ClearField("dim_param")
        return vi

    sub = helper.make_graph(
        [graph.node[i] for i in members],
        f"{graph.name}.shard{k}",
        inputs=[info(n) for n in inputs],
        outputs=[info(n) for n in outputs],
        initializer=[initializers[n] for n in used_inits],
    )
    shard_model = helper.make_model(sub, opset_imports=list(model.opset_import),
                                    producer_name="veilnet")
    shard_model.ir_version = model.ir_version
    return Shard(shard_model, inputs, outputs)
