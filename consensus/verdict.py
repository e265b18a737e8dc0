"""Deciding a replicated hop: group agreeing answers, accept a strict majority or nothing."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from consensus.fingerprint import Tolerance, fingerprints_agree, tensors_agree

# How a client checks a hop (docs/consensus.md): on several nodes at once (full), with a second
# node now and then (spot), or not at all (none). The one list the SDK, the CLI and the testnet
# use.
VERIFY_MODES = ("full", "spot", "none")

FetchFull = Callable[[str], Mapping[str, np.ndarray] | None]


@dataclass(frozen=True)
class Answer:
    """One node's answer for a hop. ``outputs`` is None when the node sent only its fingerprint.

    When ``outputs`` is given, the caller should have built ``fingerprint`` from it, and a
    caller that fetches a winner's outputs later must check them against the winning group.
    """

    node: str  # PeerID
    fingerprint: dict[str, Any]
    outputs: Mapping[str, np.ndarray] | None = None


@dataclass(frozen=True)
class Verdict:
    winners: tuple[str, ...]
    losers: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]  # largest first
    decided: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "winners": list(self.winners),
            "losers": list(self.losers),
            "groups": [list(g) for g in self.groups],
            "decided": self.decided,
            "reason": self.reason,
        }


def group_answers(answers: Sequence[Answer], tol: Tolerance,
                  fetch_full: FetchFull | None = None) -> list[list[str]]:
    """Group the nodes whose answers agree.

    Answers are taken in node-id order (not arrival order, which is timing-dependent). Each
    answer joins the first group (in creation order) whose FIRST member it agrees with, else it
    opens a new group: agreement within a tolerance is not transitive, so comparing against
    one fixed representative keeps the result deterministic and each comparison meaningful.

    Two answers agree when their fingerprints agree. When the fingerprints disagree and both
    full outputs are available (``Answer.outputs``, or ``fetch_full(node)``, called at most
    once per node and only then), the full comparison decides: a fingerprint false alarm (two
    near ties at one row's k-th place) must not split honest nodes. A ``fetch_full`` that
    raises or returns None counts as "not available" and the fingerprint verdict stands.

    Groups are returned largest first, ties by their first node id; members in id order.
    """
    ordered = sorted(answers, key=lambda a: a.node)
    for prev, cur in itertools.pairwise(ordered):
        if prev.node == cur.node:
            raise ValueError(f"node {cur.node!r} answered twice")
    fetched: dict[str, Mapping[str, np.ndarray] | None] = {}

    def full(ans: Answer) -> Mapping[str, np.ndarray] | None:
        if ans.outputs is not None:
            return ans.outputs
        if fetch_full is None:
            return None
        if ans.node not in fetched:
            try:
                fetched[ans.node] = fetch_full(ans.node)
            except Exception:  # an unreachable or refusing node: treat as unavailable
                fetched[ans.node] = None
        return fetched[ans.node]

    def agree(x: Answer, y: Answer) -> bool:
        if fingerprints_agree(x.fingerprint, y.fingerprint, tol)[0]:
            return True
        fx = full(x)
        if fx is None:
            return False
        fy = full(y)
        return fy is not None and tensors_agree(fx, fy, tol)[0]

    groups: list[list[Answer]] = []
    for ans in ordered:
        for group in groups:
            if agree(group[0], ans):
                group.append(ans)
                break
        else:
            groups.append([ans])
    result = [[a.node for a in g] for g in groups]
    result.sort(key=lambda g: (-len(g), g[0]))
    return result


def decide(answers: Sequence[Answer], tol: Tolerance,
           fetch_full: FetchFull | None = None) -> Verdict:
    """The largest group wins iff it is a strict majority (more than n/2) of the n answers.

    Otherwise the verdict is undecided, with no winners and no losers: the caller widens the
    hop to more nodes or fails it, and never returns any of these answers. A single answer
    (mode none, or spot mode without a check) is decided with that node as the winner.
    """
    n = len(answers)
    if n == 0:
        return Verdict((), (), (), False, "no answers")
    if n == 1:
        node = answers[0].node
        return Verdict((node,), (), ((node,),), True, "single answer, not cross-checked")
    groups = group_answers(answers, tol, fetch_full)
    frozen = tuple(tuple(g) for g in groups)
    sizes = [len(g) for g in groups]
    if 2 * sizes[0] > n:
        losers = tuple(sorted(node for g in groups[1:] for node in g))
        return Verdict(frozen[0], losers, frozen, True,
                       f"{sizes[0]} of {n} answers agree (groups {sizes})")
    return Verdict((), (), frozen, False, f"no strict majority among {n} answers (groups {sizes})")


def detection_probability(p: float, hops_served: int, queries: int = 1) -> float:
    """Spot mode: P(at least one check catches a node that cheats on every hop it serves).

    Assumes each hop is checked independently with probability p, a check compares the node
    with at least one honest node (so a cheat that is checked is caught), and the node cheats
    on every one of its hops_served hops in each of the queries: 1 - (1 - p)**(hops*queries).
    """
    if not (isinstance(p, int | float) and 0 <= p <= 1):
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    for what, value in (("hops_served", hops_served), ("queries", queries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{what} must be an int >= 0, got {value!r}")
    return 1.0 - (1.0 - p) ** (hops_served * queries)


def expected_queries_until_detection(p: float, hops_served: int) -> float:
    """Mean of the geometric number of queries until the first catch: 1 / (1 - (1 - p)**h)."""
    q = detection_probability(p, hops_served, 1)
    return math.inf if q == 0 else 1.0 / q
