"""Text generation through the network: the client runs the deployment's client shards (token
embedding, re-basing between node shards, final norm and LM head) and sampling; each node shard
is a ``SessionHop`` (client/session_hop.py) whose nodes keep the KV cache.

``Generation`` is one generation, driven a token at a time (``next``), so ``generate`` and the
streaming faces share it. The prompt is fed once (prefill), then each sampled token; the walk
over the shards is ``models.decoding.walk``. Closing it closes the sessions on the nodes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import trio
from tokenizers import Tokenizer

from client.results import GenerateResult, QueryError, SessionHopRecord
from client.sampling import Sampler, TextStream
from errors import InputError
from models import Manifest, ShardSpec
from models.decoding import DecoderLayout, walk
from models.gguf_tokenizer import chat_prompt
from models.pipeline import Tensors

LocalRunner = Callable[[ShardSpec, Tensors], Awaitable[Tensors]]
MAX_TOKENS_LIMIT = 4096


class Hop(Protocol):
    """One node shard of a generation (client/session_hop.py; tests may pass a local one)."""

    async def __call__(self, feeds: Tensors) -> Tensors: ...

    async def aclose(self) -> None: ...

    def record(self) -> SessionHopRecord: ...


@dataclass(frozen=True)
class TokenDelta:
    """One generated token and the text it completes (may be empty: an unfinished character,
    or a possible start of a stop string, is held back)."""

    token_id: int
    text: str


@dataclass
class Prompt:
    """A prompt as token ids, from text or chat messages."""

    ids: list[int]
    text: str

    @classmethod
    def of(cls, tokenizer: Tokenizer, manifest: Manifest, prompt: str | None,
           messages: Sequence[Mapping[str, str]] | None) -> Prompt:
        if (prompt is None) == (messages is None):
            raise InputError("give either a prompt or chat messages")
        if messages is not None:
            if isinstance(messages, str | bytes) or not messages:
                raise InputError("messages must be a non-empty list of {role, content}")
            text = chat_prompt(chat_template(manifest), messages)
        else:
            if not isinstance(prompt, str) or not prompt:
                raise InputError("the prompt must be a non-empty string")
            text = prompt
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise InputError("the prompt has no tokens")
        return cls(ids, text)


def load_tokenizer(manifest: Manifest) -> Tokenizer:
    tok = manifest.extra.get("tokenizer") or {}
    if manifest.path is None or "path" not in tok:
        raise InputError(f"{manifest.name}: the deployment names no tokenizer")
    return Tokenizer.from_file(str(manifest.path.parent / tok["path"]))


def chat_template(manifest: Manifest) -> str:
    doc = manifest.extra.get("chat_template") or {}
    if manifest.path is None or "path" not in doc:
        raise InputError(f"{manifest.name}: the model has no chat template")
    return (Path(manifest.path).parent / doc["path"]).read_text()


@dataclass
class Settings:
    """What to generate: the sampling and stopping rules, checked on construction."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise InputError(f"max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got "
                             f"{self.max_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if len(self.stop) > 4:
            raise InputError("at most 4 stop sequences")


@dataclass
class Generation:
    """One generation: ``await next()`` until it returns None, then ``result()``."""

    layout: DecoderLayout
    tokenizer: Tokenizer
    prompt: Prompt
    settings: Settings
    hops: dict[int, Hop]
    run_local: LocalRunner
    step_timeout: float
    _sampler: Sampler = field(init=False)
    _text: TextStream = field(init=False)
    _tokens: list[int] = field(default_factory=list)
    _next_input: list[int] | None = None
    _finish: str | None = None
    _started: float = field(default_factory=time.perf_counter)
    _first_token_s: float | None = None
    _step_ms: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        s = self.settings
        self._sampler = Sampler(s.temperature, s.top_p, s.seed)
        self._text = TextStream(self.tokenizer, s.stop)
        config = self.layout.config
        context = int(config.get("context_length") or 0)
        if context and len(self.prompt.ids) + s.max_tokens > context:
            raise InputError(f"context too long: {len(self.prompt.ids)} prompt tokens + "
                             f"max_tokens {s.max_tokens} > the model's context of {context}")
        eos = config.get("eos_token_id")
        self._eos = {int(eos)} if isinstance(eos, int) else set()
        self._next_input = list(self.prompt.ids)

    @property
    def finished(self) -> bool:
        return self._finish is not None

    async def _forward(self, ids: list[int]) -> np.ndarray:
        steps = walk(self.layout, np.array([ids], np.int64))
        try:
            with trio.fail_after(self.step_timeout):
                shard, feeds = next(steps)
                while True:
                    hop = self.hops.get(shard.index) if shard.role == "node" else None
                    out = await (hop(feeds) if hop is not None else self.run_local(shard, feeds))
                    shard, feeds = steps.send(out)
        except StopIteration as done:
            logits = np.asarray(done.value)[0, -1]
        except trio.TooSlowError:
            what = "the prompt" if not self._tokens else f"token {len(self._tokens) + 1}"
            raise QueryError(f"{what} took longer than {self.step_timeout:g} s") from None
        if not np.isfinite(logits).all():
            raise QueryError("the model's logits are not finite; generation stopped")
        return logits

    async def next(self) -> TokenDelta | None:
        """The next token, or None once the generation is finished."""
        if self._finish is not None or self._next_input is None:
            return None
        started = time.perf_counter()
        logits = await self._forward(self._next_input)
        if self._tokens:
            self._step_ms.append((time.perf_counter() - started) * 1e3)
        else:
            self._first_token_s = time.perf_counter() - self._started
        token = self._sampler(logits)
        self._tokens.append(token)
        if token in self._eos:
            self._finish = "stop"
            return TokenDelta(token, self._text.finish())
        delta = self._text.push(token)
        if self._text.stopped:
            self._finish = "stop"
        elif len(self._tokens) >= self.settings.max_tokens:
            self._finish = "length"
            delta += self._text.finish()
        self._next_input = None if self._finish else [token]
        return TokenDelta(token, delta)

    def holders(self) -> dict[int, list[str]]:
        """PeerIDs holding a session now, per node shard index."""
        return {i: list(getattr(h, "holders", ())) for i, h in sorted(self.hops.items())}

    async def aclose(self) -> None:
        """Close the sessions on the nodes (best effort, shielded)."""
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for hop in self.hops.values():
                await hop.aclose()

    def result(self, **receipt: Any) -> GenerateResult:
        return GenerateResult(
            text=self._text.text, token_ids=list(self._tokens),
            prompt_token_ids=list(self.prompt.ids), finish_reason=self._finish or "cancelled",
            hops=[h.record() for _, h in sorted(self.hops.items())],
            time_to_first_token_s=self._first_token_s,
            decode_ms=list(self._step_ms), **receipt)


__all__ = ["Generation", "Hop", "Prompt", "Settings", "TokenDelta", "chat_template",
           "load_tokenizer"]
