"""Shared pieces of the structure-aware fuzz tests (tests/unit/fuzz/): the per-target input
counter, the per-call time bound, the budget of each target, and hypothesis strategies that
mutate a valid object (bytes, text or a JSON/CBOR-like tree).

Every fuzz target calls a decoder through ``check``: the call must return or raise the error
class the decoder documents for bad input, within ``CALL_LIMIT_S`` seconds. Anything else (any
other exception, a slow call) fails the test with the input in hypothesis's report.

The budget: ``VEILNET_FUZZ=long`` (``make fuzz``) runs ``LONG_FACTOR`` times the examples of
the default profile, randomized; the default profile (``make test``) is derandomized so CI is
reproducible. conftest.py registers and loads the profiles and writes ``COUNTS``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import cbor2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

PROFILE = os.environ.get("VEILNET_FUZZ", "ci")
LONG_FACTOR = 20
FACTOR = LONG_FACTOR if PROFILE == "long" else 1
CALL_LIMIT_S = float(os.environ.get("VEILNET_FUZZ_CALL_LIMIT", "2"))
COUNTS: Counter[str] = Counter()  # target -> inputs run

_COMMON = dict(database=None, deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
settings.load_profile("long" if PROFILE == "long" else "ci")


def budget(examples: int) -> settings:
    """The settings of one target: ``examples`` inputs in ``make test``, ``LONG_FACTOR`` times
    as many under ``VEILNET_FUZZ=long``."""
    return settings(max_examples=examples * FACTOR)


class CallTimeout(BaseException):
    """A decoder call ran past CALL_LIMIT_S (a BaseException: no ``except Exception`` in the
    decoder swallows it)."""


@contextlib.contextmanager
def time_bound(what: str) -> Iterator[None]:
    """Interrupt the block after CALL_LIMIT_S seconds (SIGALRM, main thread only) and fail it
    if it took longer (C code may not be interruptible)."""
    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(
        signal, "setitimer")

    def expired(signum: int, frame: Any) -> None:
        raise CallTimeout(f"{what}: a call took more than {CALL_LIMIT_S} s")

    if use_alarm:
        old = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, CALL_LIMIT_S)
    start = time.monotonic()
    try:
        yield
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    elapsed = time.monotonic() - start
    if elapsed > CALL_LIMIT_S:
        raise AssertionError(f"{what}: a call took {elapsed:.2f} s, limit {CALL_LIMIT_S} s")


class Refused:
    """What ``check`` returns when the decoder raised its documented error."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __bool__(self) -> bool:
        return False


def check(target: str, fn: Callable[..., Any], *args: Any,
          errors: type[BaseException] | tuple[type[BaseException], ...], **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``: its result, or a falsy ``Refused`` when it raised one of
    ``errors``; any other exception propagates (the test fails). Counts one input of
    ``target``."""
    COUNTS[target] += 1
    with time_bound(target):
        try:
            return fn(*args, **kwargs)
        except errors as exc:
            return Refused(exc)


# -- values -------------------------------------------------------------------------------------

ODD_STRINGS = [
    "", " ", "\x00", "\n", "\r\n", "\t", "\x7f", "+", "#", "%3A", "—", "— ", "\u2028", "\u202e",
    "\ufeff", "\u00a0", "é", "e\u0301", "²", "٣", "１", "𝟙", "\U0001f680", "NaN", "Infinity",
    "-0", "1e999", "0x10", "00", "9" * 30, "a" * 5000, "z" * 70, "12D3KooW", "did:key:z6Mk",
    "did:wba:", "bafkrei", "c2sp.org/tlog-proof@v1", "cosignature/v1",
]
MAX_DUP_NODES = 3000  # values one "dup" mutation may add
HUGE_INTS = [-1, 0, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30,
             -(2**63) - 1, -(2**64)]


def run_now(coro: Coroutine[Any, Any, Any], what: str) -> Any:
    """The result of a coroutine that must finish without waiting (an in-memory stream, a
    dispatcher with nothing to await); AssertionError naming ``what`` if it waits."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError(f"{what} waited on something")


def nested(depth: int, kind: str) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


@functools.cache
def leaves(*, binary: bool = True, surrogates: bool = False, cbor_specials: bool = False,
           ) -> st.SearchStrategy[Any]:
    """Scalars of every JSON/CBOR type, with the edge cases decoders trip on."""
    options: list[st.SearchStrategy[Any]] = [
        st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE_INTS),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, 1e308, 5e-324]),
        st.text(alphabet=st.characters(codec="utf-8") if not surrogates else st.characters(),
                max_size=20),
        st.sampled_from(ODD_STRINGS),
    ]
    if surrogates:
        options.append(st.sampled_from(["\ud800", "a\udfff", "\udc80\udc80"]))
    if binary:
        options += [st.binary(max_size=80), st.sampled_from([b"", b"\x00" * 32, b"\xff" * 64])]
    if cbor_specials:
        options.append(st.sampled_from([cbor2.undefined, cbor2.CBORSimpleValue(99)]))
    return st.one_of(options)


@functools.cache
def values(**kw: Any) -> st.SearchStrategy[Any]:
    """Any tree of ``leaves``: small containers, and deep nesting now and then."""
    keys = st.one_of(st.text(max_size=8), st.sampled_from(["v", "id", "type", "cid", "data"]))
    tree = st.recursive(leaves(**kw), lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=10)
    deep = st.builds(nested, st.integers(1, 1200), st.sampled_from(["list", "dict"]))
    return st.one_of(tree, tree, tree, deep)


# -- mutations ----------------------------------------------------------------------------------

@st.composite
def mutated_bytes(draw: st.DrawFn, valid: bytes, max_ops: int = 4) -> bytes:
    """``valid`` after 1 to ``max_ops`` byte-level mutations: bit flips, inserted, deleted,
    replaced, duplicated or truncated runs, and interesting byte values."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "dup", "truncate",
                                   "replace"]))
        n = len(data)
        at = draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x0A, 0x20, 0x2B, 0x7F, 0x80, 0xC0,
                                             0xFF, 0x18, 0x1B, 0x1F, 0x9F, 0xBF, 0xF6, 0xF7,
                                             0xFA, 0xFB, 0xD8, 0x5F, 0x7B, 0x22]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "dup" and n:
            piece = data[at:at + draw(st.integers(1, 64))]
            data[at:at] = piece * draw(st.integers(1, 50))
        elif op == "truncate":
            del data[at:]
        elif op == "replace" and n:
            width = draw(st.integers(1, 8))
            data[at:at + width] = draw(st.binary(min_size=width, max_size=width))
    return bytes(data)


@st.composite
def mutated_text(draw: st.DrawFn, valid: str, max_ops: int = 4) -> str:
    """``valid`` after character-level mutations (line-aware: lines dropped, doubled or
    swapped; odd characters inserted)."""
    text = valid
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "line-drop", "line-dup",
                                   "line-swap", "truncate", "odd"]))
        at = draw(st.integers(0, len(text)))
        if op == "insert":
            text = text[:at] + draw(st.text(min_size=1, max_size=8)) + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 8)):]
        elif op == "replace":
            text = text[:at] + draw(st.characters()) + text[at + 1:]
        elif op == "truncate":
            text = text[:at]
        elif op == "odd":
            odd = draw(st.sampled_from([*ODD_STRINGS, "\n", "\n\n", "\ud800"]))
            text = text[:at] + odd + text[at:]
        else:
            lines = text.split("\n")
            i = draw(st.integers(0, len(lines) - 1))
            if op == "line-drop":
                del lines[i]
            elif op == "line-dup":
                lines[i:i] = [lines[i]] * draw(st.integers(1, 120))
            else:
                j = draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    return text


def paths(value: Any, max_depth: int = 12) -> list[tuple[Any, ...]]:
    """Paths (keys and indexes) into a tree of dicts and lists, the root first, at most
    ``max_depth`` deep (an inserted deep nesting is mutated as a whole)."""
    out: list[tuple[Any, ...]] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), value)]
    while stack:
        path, node = stack.pop()
        out.append(path)
        if len(path) >= max_depth:
            continue
        if isinstance(node, dict):
            stack.extend(((*path, k), v) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(node))))
    return out


def _copy(value: Any, depth: int = 0) -> Any:
    if depth > 12:  # deeper levels are never mutated in place: shared, not copied
        return value
    if isinstance(value, dict):
        return {k: _copy(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v, depth + 1) for v in value]
    return value


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


@st.composite
def similar(draw: st.DrawFn, old: Any, **kw: Any) -> Any:
    """A value near ``old``: same type but an edge case, a mutated string or bytes."""
    if isinstance(old, bool):
        return not old
    if isinstance(old, int):
        return draw(st.one_of(st.sampled_from(HUGE_INTS), st.just(old + 1), st.just(-old),
                              st.just(float(old))))
    if isinstance(old, float):
        return draw(st.sampled_from([math.nan, math.inf, -math.inf, -old, old + 0.5]))
    if isinstance(old, str):
        text = draw(mutated_text(old, max_ops=2))
        if not kw.get("surrogates"):
            text = text.encode("utf-8", "replace").decode("utf-8")
        return text
    if isinstance(old, bytes):
        return draw(mutated_bytes(old, max_ops=2))
    return draw(leaves(**kw))


@st.composite
def mutated_tree(draw: st.DrawFn, valid: Any, max_ops: int = 3, **kw: Any) -> Any:
    """``valid`` (dicts, lists, scalars) after 1 to ``max_ops`` structural mutations at random
    paths: a value replaced by one of another type or an edge case of its own type, a field
    dropped or added, a list element duplicated, a value wrapped in a list."""
    tree = _copy(valid)
    for _ in range(draw(st.integers(1, max_ops))):
        all_paths = paths(tree)
        path = draw(st.sampled_from(all_paths))
        node = _get(tree, path)
        op = draw(st.sampled_from(["other", "similar", "similar", "drop", "add", "dup",
                                   "wrap"]))
        if op == "add" and isinstance(node, dict):
            key = draw(st.one_of(st.text(max_size=10), st.sampled_from(
                ["v", "id", "signatures", "proof", "extra", "__proto__"])))
            node[key] = draw(values(**kw))
            continue
        if op == "dup" and isinstance(node, list) and node:
            # copies, not references, and at most MAX_DUP_NODES values in all: a tree that
            # shares subtrees would stand for a document far larger than any that is parsed
            item = node[draw(st.integers(0, len(node) - 1))]
            times = min(draw(st.integers(1, 300)), MAX_DUP_NODES // len(paths(item, 64)))
            node.extend(_copy(item) for _ in range(times))
            continue
        if not path:  # the root itself
            if op in ("other", "wrap"):
                tree = draw(values(**kw)) if op == "other" else [tree]
            continue
        parent = _get(tree, path[:-1])
        last = path[-1]
        if op == "drop":
            del parent[last]
        elif op == "wrap":
            parent[last] = [node]
        elif op == "similar":
            parent[last] = draw(similar(node, **kw))
        else:
            parent[last] = draw(values(**kw))
    return tree
