"""Run one shard with onnxruntime, checking inputs against the shard's manifest entry.

Threads: each session has its own onnxruntime thread pool, spinning or not as asked. A process
that owns all its sessions and runs alone (a benchmark, an in-process ``Pipeline``) may call
``use_shared_pool`` first, so that its sessions, run one after another, share one pool instead
of each keeping workers that fight for the same cores: the split SmolLM2 decodes at
15.5-17 ms/token that way against 19.7-25 with a pool per session (docs/benchmarks.md, "Text
generation"). It is not the default anywhere: onnxruntime then refuses every session with its
own pool (an application embedding the client SDK may have its own), and the shared pool's
workers spin, which made decoding through three node processes on two cores 1.4x slower.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from errors import InputError
from models.manifest import ShardSpec

_shared_pool: int | None = None  # threads of the process's shared pool, once set up


def use_shared_pool(threads: int | None = None) -> int:
    """From now on every session of this process shares one onnxruntime thread pool of
    ``threads`` (default: one per core). Call it before the first session; later calls keep the
    first size. Returns the pool's size."""
    global _shared_pool
    if _shared_pool is None:
        _shared_pool = threads or os.cpu_count() or 1
        ort.set_global_thread_pool_sizes(_shared_pool, 1)
    return _shared_pool


class ShardInputError(InputError):
    """Inputs that do not match what the shard declares (names, dtypes, ranks, fixed dims)."""


def session_options(threads: int | None = None, spin: bool = True) -> ort.SessionOptions:
    """onnxruntime CPU options: the process's shared pool once ``use_shared_pool`` was called,
    else a pool for this session alone (``threads`` threads, default one per core).
    ``spin=False`` stops idle worker threads from busy-waiting after a run, which matters when
    several processes (client and nodes) share the cores."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    if _shared_pool is not None:
        opts.use_per_session_threads = False
    elif threads:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def check_inputs(spec: ShardSpec, feeds: Mapping[str, np.ndarray]) -> None:
    expected = {t.name: t for t in spec.inputs}
    missing = sorted(set(expected) - set(feeds))
    unexpected = sorted(set(feeds) - set(expected))
    if missing or unexpected:
        raise ShardInputError(f"shard {spec.cid}: missing inputs {missing}, unexpected "
                              f"{unexpected}; it takes {sorted(expected)}")
    for name, t in expected.items():
        value = feeds[name]
        if not isinstance(value, np.ndarray):
            raise ShardInputError(f"input {name!r}: expected a numpy array")
        if value.dtype.name != t.dtype:
            raise ShardInputError(f"input {name!r}: dtype {value.dtype.name}, expected {t.dtype}")
        if value.ndim != len(t.shape):
            raise ShardInputError(f"input {name!r}: rank {value.ndim} {list(value.shape)}, "
                                  f"expected rank {len(t.shape)} {list(t.shape)}")
        for axis, (got, want) in enumerate(zip(value.shape, t.shape, strict=True)):
            if isinstance(want, int) and got != want:
                raise ShardInputError(f"input {name!r}: dimension {axis} is {got}, expected "
                                      f"{want}")


class ShardSession:
    """An onnxruntime session for one shard file."""

    def __init__(self, path: Path, spec: ShardSpec, threads: int | None = None,
                 spin: bool = True) -> None:
        self.spec = spec
        self.path = Path(path)
        self._session = ort.InferenceSession(
            str(path), sess_options=session_options(threads, spin),
            providers=["CPUExecutionProvider"])
        self._outputs = [t.name for t in spec.outputs]

    def run(self, feeds: Mapping[str, np.ndarray], check: bool = True,
            ) -> dict[str, np.ndarray]:
        """Outputs by name; ``check=False`` when the caller has run check_inputs already."""
        if check:
            check_inputs(self.spec, feeds)
        values = self._session.run(self._outputs, dict(feeds))
        return dict(zip(self._outputs, values, strict=True))
