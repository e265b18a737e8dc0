"""Choosing the next token from logits, on the client: greedy, temperature and nucleus (top-p)
sampling with a seedable generator, and the text of a generation as it grows.

Sampling is a few lines of numpy, written here because the client must hold it (logits never
leave the client) and no maintained library does only this without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from errors import InputError

REPLACEMENT = "\ufffd"  # what a byte-level BPE decodes an unfinished UTF-8 sequence to


@dataclass
class Sampler:
    """``temperature`` 0 is greedy (argmax, ties to the lowest id); otherwise softmax of
    logits / temperature restricted to the smallest set of tokens whose probability reaches
    ``top_p``. ``seed`` makes the draws repeatable."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
                and 0.0 <= self.temperature <= 100.0):
            raise InputError(f"temperature must be between 0 and 100, got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise InputError(f"seed must be a non-negative integer, got {self.seed!r}")
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, np.float64).reshape(-1)
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        z = logits / self.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.top_p)) + 1]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self._rng.choice(p.shape[0], p=p))


class TextStream:
    """The text of generated ids as it grows: ``push(id)`` returns the new text that is
    final (held back while the bytes decoded so far end inside a UTF-8 character), and stop
    strings cut the text where they begin."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        if any(not isinstance(s, str) or not s for s in stop):
            raise InputError("stop sequences must be non-empty strings")
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self._decoded()
        if full.endswith(REPLACEMENT):
            return ""  # an unfinished character: wait for its next byte
        hold = 0
        for s in self.stop:
            at = full.find(s, max(0, len(self.text) - len(s)))
            if at != -1:
                self.stopped = True
                full = full[:at]
                break
            # keep back a tail that may still grow into a stop string
            for k in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        visible = full if self.stopped else full[:len(full) - hold]
        delta = visible[len(self.text):]
        self.text = visible if len(visible) >= len(self.text) else self.text
        return delta

    def finish(self) -> str:
        """The text held back at the end (a stop-string prefix that never completed)."""
        if self.stopped:
            return ""
        full = self._decoded().rstrip(REPLACEMENT)
        delta = full[len(self.text):]
        self.text = full
        return delta


__all__ = ["Sampler", "TextStream"]
