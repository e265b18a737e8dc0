"""Deliberately wrong answers, for testing consensus checks only (``--byzantine-test-mode``).

A node started with this flag computes the shard as usual and then returns a wrong answer,
signed as if it were right (a liar signs its lies; only cross-verification catches it):

    noise        the right outputs plus Gaussian noise of 10% of each tensor's std
    zeros        zeros of the right shape
    stale        the previous answer this node gave for the shard (another input); when the
                 shapes differ, the right outputs with their rows rotated (an answer for other
                 inputs)
    wrong-shard  another stored shard run on the same inputs, or else this shard run twice
    random       uniform noise of the right shape, scaled to each tensor's std

It is off by default; the node prints a warning at start and logs each corrupted answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import numpy as np

log = logging.getLogger("veilnet.byzantine")

MODES = ("noise", "zeros", "stale", "wrong-shard", "random")

RunShard = Callable[[str, dict[str, np.ndarray]], Awaitable[dict[str, np.ndarray]]]


class Byzantine:
    def __init__(self, mode: str, seed: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"byzantine mode {mode!r}: use one of {', '.join(MODES)}")
        self.mode = mode
        self.rng = np.random.default_rng(seed)
        self._last: dict[str, dict[str, np.ndarray]] = {}  # shard CID -> previous true outputs

    async def corrupt(self, shard: str, feeds: Mapping[str, np.ndarray],
                      outputs: dict[str, np.ndarray], others: list[str],
                      run: RunShard) -> dict[str, np.ndarray]:
        """The wrong answer to give instead of ``outputs`` (the true outputs of ``shard``)."""
        previous, self._last[shard] = self._last.get(shard), outputs
        if self.mode == "noise":
            wrong = {n: (a + self.rng.normal(0, 0.1 * (float(a.std()) or 1.0), a.shape))
                     .astype(a.dtype) for n, a in outputs.items()}
        elif self.mode == "zeros":
            wrong = {n: np.zeros_like(a) for n, a in outputs.items()}
        elif self.mode == "random":
            wrong = {n: self.rng.uniform(-1, 1, a.shape).astype(a.dtype)
                     * np.asarray(float(a.std()) or 1.0, a.dtype) for n, a in outputs.items()}
        elif self.mode == "stale":
            if previous is not None and all(previous[n].shape == a.shape
                                            for n, a in outputs.items() if n in previous):
                wrong = {n: previous.get(n, a) for n, a in outputs.items()}
            else:
                wrong = {n: np.roll(a.reshape(-1, a.shape[-1]) if a.ndim else a, 1, axis=0)
                         .reshape(a.shape) for n, a in outputs.items()}
        else:  # wrong-shard
            wrong = await self._other_shard(shard, feeds, outputs, others, run)
        log.warning("byzantine test mode %s: corrupted the answer for shard %s", self.mode,
                    shard)
        return wrong

    async def _other_shard(self, shard: str, feeds: Mapping[str, np.ndarray],
                           outputs: dict[str, np.ndarray], others: list[str],
                           run: RunShard) -> dict[str, np.ndarray]:
        for other in others:
            if other == shard:
                continue
            try:
                result = await run(other, dict(feeds))
            except Exception:  # inputs do not fit that shard: try the next
                continue
            if set(result) == set(outputs) and all(result[n].shape == outputs[n].shape
                                                   for n in outputs):
                return result
        # this shard again, on its own outputs put in place of the inputs they resemble
        again = dict(feeds)
        for out in outputs.values():
            for name, arr in feeds.items():
                if arr.shape == out.shape and arr.dtype == out.dtype:
                    again[name] = out
                    break
        try:
            result = await run(shard, again)
        except Exception:  # test mode: any failure just means another way to lie
            result = {}
        if set(result) == set(outputs) and any(
                result[n].shape == outputs[n].shape and not np.array_equal(result[n], outputs[n])
                for n in outputs):
            return result
        return {n: np.flip(a).copy() for n, a in outputs.items()}
