"""The generation side of the chaos soak (scripts/chaos.py ``--model smollm2``): the prompts its
clients draw from, the plaintext reference they are compared with, and the comparison.

The reference is ``models.decoding.LocalDecoder`` on the unencrypted import (no node, no key:
an independent computation), greedy, computed once per prompt in the soak's process before the
clients start. Greedy decoding is deterministic, so every network generation of a prompt must
give exactly these tokens: a generation that stops at the end-of-sequence token sooner ends
with it, as the reference does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_TOKENS = 8  # tokens per generation (chaos.py --max-tokens)
PROMPTS: list[tuple[str, str]] = [  # (chat: a user message in the chat template | plain, text)
    ("chat", "What is the capital of France?"),
    ("chat", "Write a short poem about the sea."),
    ("plain", "Once upon a time, in a small village by the mountains,"),
    ("chat", "Explain how a rainbow forms."),
    ("plain", "def fibonacci(n):"),
    ("chat", "Translate 'good morning' into French."),
    ("plain", "The ledger never forgets an entry because"),
    ("chat", "naïve café résumé — what do these words mean?"),
]
MAX_LISTED = 20  # wrong generations listed in full in the report


def prompt_args(i: int) -> dict[str, Any]:
    """Keyword arguments of ``AsyncClient.generate`` for prompt ``i``."""
    kind, text = PROMPTS[i]
    if kind == "chat":
        return {"messages": [{"role": "user", "content": text}]}
    return {"prompt": text}


def references(model: Path, max_tokens: int) -> list[list[int]]:
    """The plaintext model's greedy tokens for every prompt, at most ``max_tokens`` each."""
    from client.generation import Prompt, load_tokenizer
    from models.decoding import LocalDecoder

    decoder = LocalDecoder(model, threads=1, spin=False)
    manifest = decoder.pipeline.manifest
    tokenizer = load_tokenizer(manifest)
    eos = manifest.extra["config"].get("eos_token_id")
    stop = [int(eos)] if isinstance(eos, int) else []  # as client.generation.Generation
    runs = []
    for i in range(len(PROMPTS)):
        a = prompt_args(i)
        prompt = Prompt.of(tokenizer, manifest, a.get("prompt"), a.get("messages"))
        runs.append(decoder.greedy(prompt.ids, max_tokens, stop=stop))
    return runs


async def generate(client: Any, i: int, max_tokens: int) -> Any:
    """One greedy generation of prompt ``i`` through the network (a ``GenerateResult``)."""
    return await client.generate(**prompt_args(i), max_tokens=max_tokens)


def compare(result: Any, want: list[int]) -> tuple[int, str]:
    """(tokens that differ from the reference, counting a length difference; a description
    when any do) of a ``GenerateResult``."""
    got = list(result.token_ids)
    differ = sum(1 for a, b in zip(got, want, strict=False) if a != b) + abs(len(got) - len(want))
    if not differ:
        return 0, ""
    first = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                 min(len(got), len(want)))
    return differ, f"first differs at token {first}: got {got}, want {want}"


def hop_counts(result: Any) -> tuple[int, int]:
    """(sessions replayed on another node after a failure, verdicts a node lost) over the hops
    of a ``GenerateResult``: how much of the chaos the generation went through."""
    return (sum(h.replays for h in result.hops),
            sum(len(v.get("losers", ())) for h in result.hops for v in h.verdicts))


def tally(generations: list[Any], t0: float) -> dict[str, Any]:
    """The generation-only counts of the report (added to the ones shared with queries)."""
    done = [g for g in generations if g.ok]
    wrong = [g for g in done if g.wrong]
    return {"max_tokens_differing": max((int(g.diff) for g in done), default=None),
            "tokens": sum(g.tokens for g in done), "replays": sum(g.replays for g in done),
            "verdicts_lost": sum(g.verdicts_lost for g in done),
            "wrong": [{"at_s": round(g.start - t0, 1), "client": g.client, "prompt": g.text,
                       "detail": g.detail} for g in wrong[:MAX_LISTED]]}


__all__ = ["MAX_TOKENS", "PROMPTS", "compare", "generate", "hop_counts", "prompt_args",
           "references", "tally"]
