"""The client's generation loop (client/generation.py) with every shard run in-process: the
walk over the split decoder, sampling, stopping, against transformers' greedy tokens
(tests/data/smollm2_reference.json, made once by scripts/make_reference_logits.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from tokenizers import Tokenizer

from client.generation import Generation, Prompt, Settings, load_tokenizer
from client.results import SessionHopRecord
from errors import InputError
from models import Manifest, Pipeline
from models.decoding import DecoderLayout, LocalHop
from models.pipeline import Tensors

REFERENCE = json.loads((Path(__file__).resolve().parents[2] / "data" /
                        "smollm2_reference.json").read_text())


class AsyncLocalHop:
    """A node shard run here (the network edge faked: no node, same cache discipline)."""

    def __init__(self, hop: LocalHop) -> None:
        self.hop, self.calls, self.closed = hop, 0, False

    async def __call__(self, feeds: Tensors) -> Tensors:
        self.calls += 1
        return self.hop(feeds)

    async def aclose(self) -> None:
        self.closed = True

    def record(self) -> SessionHopRecord:
        s = self.hop.shard
        return SessionHopRecord(s.index, s.cid, "did:key:local", "local", ("local",),
                                ("did:key:local",), self.calls, 0, 0, 0.0, "", "", "", "", "")


@pytest.fixture(scope="module")
def pipeline(smollm2_dir: Path) -> Pipeline:
    return Pipeline(smollm2_dir, threads=2, spin=False)


def generation(pipeline: Pipeline, prompt: Prompt, settings: Settings) -> Generation:
    layout = DecoderLayout.of(pipeline.manifest)
    hops = {s.index: AsyncLocalHop(LocalHop(pipeline, layout, s))
            for s in pipeline.manifest.node_shards}

    async def run_local(shard, feeds):
        return pipeline.run_local(shard, feeds)

    return Generation(layout, load_tokenizer(pipeline.manifest), prompt, settings, hops,
                      run_local, 60.0)


def run(gen: Generation) -> list:
    async def main() -> list:
        out = []
        while (t := await gen.next()) is not None:
            out.append(t)
        await gen.aclose()
        return out

    return trio.run(main)


@pytest.mark.parametrize("index", [0, 5])
def test_greedy_generation_matches_transformers(pipeline: Pipeline, index: int) -> None:
    case = REFERENCE["cases"][index]
    want = case["greedy"]["ids"]
    prompt = Prompt(list(case["prompt_ids"]), case["prompt_text"])
    gen = generation(pipeline, prompt, Settings(max_tokens=len(want)))
    tokens = run(gen)
    got = [t.token_id for t in tokens]
    eos = pipeline.manifest.extra["config"]["eos_token_id"]
    assert got == want[:len(got)]
    assert len(got) == len(want) or got[-1] == eos
    result = gen.result()
    assert result.token_ids == got
    assert result.text == "".join(t.text for t in tokens)
    assert [h.steps for h in result.hops] == [len(got)] * 3  # prefill + one per later token
    assert all(h.closed for h in gen.hops.values())  # type: ignore[attr-defined]


def test_chat_prompt_and_stop_string(pipeline: Pipeline) -> None:
    tokenizer = load_tokenizer(pipeline.manifest)
    prompt = Prompt.of(tokenizer, pipeline.manifest, None,
                       [{"role": "user", "content": "Count from one to ten in words."}])
    assert prompt.text.endswith("<|im_start|>assistant\n")
    free = run(generation(pipeline, prompt, Settings(max_tokens=24)))
    text = "".join(t.text for t in free)
    # stop at the second word the model wrote (whatever it is): the text ends right before it
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    cut = run(generation(pipeline, prompt, Settings(max_tokens=24, stop=[stop])))
    got = "".join(t.text for t in cut)
    assert got == text[:text.index(stop)]


def test_context_and_settings_errors(pipeline: Pipeline, smollm2_dir: Path) -> None:
    tokenizer: Tokenizer = load_tokenizer(pipeline.manifest)
    context = pipeline.manifest.extra["config"]["context_length"]
    long = Prompt(list(range(5, 5 + context - 3)), "x")
    with pytest.raises(InputError, match="context too long"):
        generation(pipeline, long, Settings(max_tokens=8))
    with pytest.raises(InputError, match="max_tokens"):
        Settings(max_tokens=0)
    with pytest.raises(InputError, match="either a prompt or chat messages"):
        Prompt.of(tokenizer, pipeline.manifest, "hi", [{"role": "user", "content": "x"}])
    with pytest.raises(InputError, match="non-empty"):
        Prompt.of(tokenizer, pipeline.manifest, "", None)
    encoder_like = Manifest.load(smollm2_dir)
    encoder_like.extra.pop("kv_cache")
    with pytest.raises(InputError, match="not a decoder"):
        DecoderLayout.of(encoder_like)
