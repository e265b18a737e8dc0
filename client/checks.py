"""Checks the client applies to every node answer, and to the query's final outputs.

A node's outputs must have the shard's output names, dtypes and ranks, and contain only finite
values; a fingerprint must describe those tensors and be finite too. Anything else raises
``WireError``: the hop counts as failed and is retried on another node. A NaN or an infinity
is never a legitimate activation of an encrypted shard, and it would poison every later step
(with ``verify="none"`` nothing else would catch it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from models import ShardSpec
from node.wire import WireError


def check_outputs(shard: ShardSpec, outputs: Mapping[str, np.ndarray]) -> None:
    """Names, dtypes, ranks and finiteness of a node's outputs for ``shard``."""
    expected = {t.name: t for t in shard.outputs}
    if set(outputs) != set(expected):
        raise WireError("bad_response", f"outputs {sorted(outputs)}, expected {sorted(expected)}")
    for name, spec in expected.items():
        value = outputs[name]
        if value.dtype.name != spec.dtype or value.ndim != len(spec.shape):
            raise WireError("bad_response", f"output {name!r} is {value.dtype.name} rank "
                                            f"{value.ndim}, expected {spec.dtype} rank "
                                            f"{len(spec.shape)}")
    bad = non_finite(outputs)
    if bad:
        raise WireError("bad_response", f"non-finite outputs: {bad}")


def check_fingerprint_shape(shard: ShardSpec, fp: dict[str, Any]) -> None:
    """A (validated) fingerprint of the shard's outputs, with finite values."""
    expected = {t.name: t for t in shard.outputs}
    tensors = fp.get("tensors", {})
    if set(tensors) != set(expected):
        raise WireError("bad_response", f"fingerprint of {sorted(tensors)}, expected "
                                        f"{sorted(expected)}")
    for name, spec in expected.items():
        t = tensors[name]
        if t.get("dtype") != spec.dtype or len(t.get("shape", ())) != len(spec.shape):
            raise WireError("bad_response", f"fingerprint of {name!r} has the wrong dtype or "
                                            "rank")
        values = np.frombuffer(t.get("val", b""), dtype="<f4")
        if not (math.isfinite(t.get("sum", 0.0)) and math.isfinite(t.get("l2", 0.0))
                and bool(np.isfinite(values).all())):
            raise WireError("bad_response", f"non-finite outputs: the fingerprint of {name!r} "
                                            "holds NaN or infinite values")


def non_finite(tensors: Mapping[str, np.ndarray]) -> str:
    """'' when every floating-point tensor is finite, else which ones are not and how."""
    problems = []
    for name, value in tensors.items():
        if value.dtype.kind not in "fc":
            continue
        finite = np.isfinite(value)
        if not bool(finite.all()):
            nan = int(np.isnan(value).sum())
            problems.append(f"{name!r} has {nan} NaN and {int((~finite).sum()) - nan} "
                            f"infinite value(s) of {value.size}")
    return "; ".join(problems)


__all__ = ["check_fingerprint_shape", "check_outputs", "non_finite"]
