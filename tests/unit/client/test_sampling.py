"""Client-side sampling and the growing text of a generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from client.sampling import Sampler, TextStream
from errors import InputError


def test_greedy_is_argmax_with_ties_to_the_lowest_id() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        logits = rng.normal(size=100)
        assert Sampler()(logits) == int(np.argmax(logits))
    assert Sampler()(np.array([1.0, 3.0, 3.0])) == 1


def test_temperature_draws_follow_the_softmax() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(temperature=1.0, seed=7)
    counts = np.bincount([sampler(logits) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    hot = Sampler(temperature=2.0, seed=7)  # flatter: p ~ sqrt(p0)
    counts = np.bincount([hot(logits) for _ in range(20000)], minlength=4) / 20000
    expect = np.sqrt([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(counts, expect / expect.sum(), atol=0.015)


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = np.log(np.array([0.05, 0.5, 0.3, 0.15]))
    sampler = Sampler(temperature=1.0, top_p=0.75, seed=3)  # 0.5 + 0.3 reach 0.75
    drawn = {sampler(logits) for _ in range(3000)}
    assert drawn == {1, 2}


def test_a_seed_repeats_the_draws_and_another_seed_differs() -> None:
    logits = np.random.default_rng(0).normal(size=500)
    a = [Sampler(1.0, 0.9, seed=11)(logits) for _ in range(1)]
    s1, s2, s3 = Sampler(1.0, 0.9, seed=11), Sampler(1.0, 0.9, seed=11), Sampler(1.0, 0.9, 12)
    first = [s1(logits) for _ in range(40)]
    assert first == [s2(logits) for _ in range(40)]
    assert first != [s3(logits) for _ in range(40)]
    assert a[0] == first[0]


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"temperature": float("nan")},
                                    {"top_p": 0}, {"top_p": 1.5}, {"seed": -3}])
def test_bad_settings_are_refused_by_name(kwargs: dict) -> None:
    with pytest.raises(InputError, match=next(iter(kwargs))):
        Sampler(**kwargs)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


def test_text_grows_token_by_token_and_holds_back_split_characters(
        tokenizer: Tokenizer) -> None:
    text = "Grüße, 東京! 🙂 done"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some token ended inside a character


def test_a_stop_string_cuts_the_text_where_it_begins(tokenizer: Tokenizer) -> None:
    text = "one two three STOP four five"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    stream = TextStream(tokenizer, stop=["STOP"])
    out = ""
    for i in ids:
        out += stream.push(i)
        if stream.stopped:
            break
    assert stream.stopped
    assert out == "one two three "
    assert "ST" not in out


def test_a_stop_prefix_that_never_completes_is_released_at_the_end(
        tokenizer: Tokenizer) -> None:
    text = "A list: ST"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    stream = TextStream(tokenizer, stop=["STOP"])
    out = "".join(stream.push(i) for i in ids)
    assert not out.endswith("ST")
    assert out + stream.finish() == text
    with pytest.raises(InputError):
        TextStream(tokenizer, stop=[""])
