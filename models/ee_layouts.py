"""Layouts: how an encrypted tensor relates to its plaintext twin.

- ``Plain``: identical (the attention bias, shape tensors).
- ``Flat(space, kind)``: the last axis is in a secret space. ``kind == "perm"`` is a permutation
  space (hidden, FFN intermediate); ``q``/``k``/``v`` are the flat head-mixed attention layouts.
- ``Heads(space, kind, head_axis, feat_axis)``: per-head tensors; heads permuted along
  ``head_axis``, each head's features mixed along ``feat_axis``.
- ``HeadPerm(space, head_axis)``: attention scores and probabilities, equal to the plaintext ones up
  to the secret head order.

"Permutation-like" layouts (Plain, perm Flat, HeadPerm) commute with any elementwise function;
mixed ones commute only with linear maps.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plain:
    def describe(self) -> str:
        return "plain"


@dataclass(frozen=True)
class Flat:
    space: str
    kind: str = "perm"

    def describe(self) -> str:
        return f"{self.kind} space {self.space}"


@dataclass(frozen=True)
class Heads:
    space: str
    kind: str
    head_axis: int
    feat_axis: int

    def describe(self) -> str:
        return f"{self.kind} heads of {self.space}"


@dataclass(frozen=True)
class HeadPerm:
    space: str
    head_axis: int

    def describe(self) -> str:
        return f"head-permuted by {self.space}"


Layout = Plain | Flat | Heads | HeadPerm
PLAIN = Plain()


def perm_like(layout: Layout) -> bool:
    return isinstance(layout, Plain | HeadPerm) or (
        isinstance(layout, Flat) and layout.kind == "perm"
    )


def head_axis_of(layout: Layout) -> int | None:
    return layout.head_axis if isinstance(layout, Heads | HeadPerm) else None
