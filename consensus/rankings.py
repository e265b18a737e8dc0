"""Aggregating many reporters' score reports so that a weight minority cannot move a node.

Rule (Yuma-consensus style clipping, made two-sided; docs/consensus.md has the proof):
for each node, over the reporters that scored it with weight > 0,

- lo = lower weighted median, hi = upper weighted median of their scores;
- each score is clipped to [lo, hi] (from above as in Yuma: nobody lifts a node above
  consensus; and from below: nobody sinks it under consensus);
- score = weighted mean of the clipped scores.

Guarantee: if the reporters that are honest hold strictly more than half of the weight of a
node's reporters, its score lies in [min, max] of the honest reporters' scores for it, whatever
the others report. The score equals the weighted median unless the weights split exactly in
half, where it averages the two middle values. Weight sums use exact fractions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any


@dataclass(frozen=True)
class Report:
    reporter: str
    weight: float
    scores: Mapping[str, float]  # node -> score in [0, 1]


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def weighted_median(values: Sequence[float], weights: Sequence[float]) -> float:
    """Lower weighted median: the smallest value v with weight(values <= v) >= total / 2.

    Tie rule: when the weight at or below v is exactly half the total, v (the lower of the two
    middle values) is returned. Entries of weight 0 are ignored; weights must be >= 0.
    """
    if len(values) != len(weights):
        raise ValueError("values and weights differ in length")
    pairs: list[tuple[float, Fraction]] = []
    for v, w in zip(values, weights, strict=True):
        v, w = _finite(v, "value"), _finite(w, "weight")
        if w < 0:
            raise ValueError(f"weight must be >= 0, got {w!r}")
        if w > 0:
            pairs.append((v, Fraction(w)))
    if not pairs:
        raise ValueError("weighted median of no positive weight")
    pairs.sort(key=lambda p: p[0])
    half = sum((w for _, w in pairs), Fraction(0)) / 2
    acc = Fraction(0)
    for v, w in pairs:
        acc += w
        if acc >= half:
            return v
    raise AssertionError("unreachable")  # pragma: no cover


def upper_weighted_median(values: Sequence[float], weights: Sequence[float]) -> float:
    """The largest value v with weight(values >= v) >= total / 2."""
    return -weighted_median([-v for v in values], weights)


def aggregate(reports: Sequence[Report], *, min_reporters: int = 1) -> list[dict[str, Any]]:
    """Rows {"node", "score", "median", "reporters", "weight"}, best score first, ties by node.

    Nodes scored by fewer than min_reporters reporters (of weight > 0) are left out. The
    guarantee is relative to the reporters that scored the node: a caller that must resist a
    node scored only by colluding reporters should also require a minimum "weight".
    """
    if isinstance(min_reporters, bool) or not isinstance(min_reporters, int) or min_reporters < 1:
        raise ValueError(f"min_reporters must be an int >= 1, got {min_reporters!r}")
    seen: set[str] = set()
    per_node: dict[str, list[tuple[float, float]]] = {}
    for rep in reports:
        if rep.reporter in seen:
            raise ValueError(f"reporter {rep.reporter!r} reported twice")
        seen.add(rep.reporter)
        weight = _finite(rep.weight, f"weight of {rep.reporter!r}")
        if weight < 0:
            raise ValueError(f"weight of {rep.reporter!r} must be >= 0")
        if weight == 0:
            continue
        for node, score in rep.scores.items():
            s = _finite(score, f"score of {node!r} by {rep.reporter!r}")
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"score of {node!r} by {rep.reporter!r} is outside [0, 1]")
            per_node.setdefault(str(node), []).append((s, weight))
    rows: list[dict[str, Any]] = []
    for node, entries in per_node.items():
        if len(entries) < min_reporters:
            continue
        values = [s for s, _ in entries]
        weights = [w for _, w in entries]
        lo = weighted_median(values, weights)
        hi = upper_weighted_median(values, weights)
        total = sum((Fraction(w) for w in weights), Fraction(0))
        mean = sum((Fraction(w) * Fraction(min(max(s, lo), hi)) for s, w in entries),
                   Fraction(0)) / total
        score = min(max(float(mean), lo), hi)
        rows.append({"node": node, "score": score, "median": lo, "reporters": len(entries),
                     "weight": float(total)})
    rows.sort(key=lambda r: (-r["score"], r["node"]))
    return rows
