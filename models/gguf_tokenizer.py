"""A Hugging Face ``tokenizers.Tokenizer`` rebuilt from a GGUF file's ``tokenizer.ggml.*`` fields.

Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``, as SmolLM2's) are
supported, built the way transformers' GGUF converter builds them: a BPE model from the token
list (id = position) and the merges ("left right", in priority order), the GPT-2 byte-level
pre-tokenizer without a prefix space, a byte-level decoder, no normalizer, and every control
token (llama.cpp token type 3) and user-defined token (type 4) added as a special token, so
that ``<|im_start|>`` in a text encodes to its single id. llama.cpp's ``smollm`` pre-tokenizer
also splits digits one by one (as the original SmolLM2 tokenizer.json does); that is kept here.

``chat_prompt`` renders a chat template. The GGUF's template is Jinja, and jinja2 is not one of
veilnet's dependencies, so ChatML templates (``<|im_start|>role\\ncontent<|im_end|>\\n``, with an
optional default system message, SmolLM2's template) are recognised and rendered directly; any
other template is refused with an error rather than rendered wrongly.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from models.gguf_model import GgufError, GgufModel, GgufTokenizerData

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) whose splitting is the GPT-2 regex,
# optionally preceded by splitting digits one by one.
_GPT2_REGEX_PRE = {None, "default", "gpt2"}
_DIGITS_THEN_GPT2_REGEX_PRE = {"smollm", "starcoder", "refact", "codeshell"}


def build_tokenizer(model: GgufModel | GgufTokenizerData) -> Tokenizer:
    """The GGUF's tokenizer as a ``tokenizers.Tokenizer`` (``to_str()`` gives tokenizer.json)."""
    tok = model.tokenizer if isinstance(model, GgufModel) else model
    if tok.model != "gpt2":
        raise GgufError(f"tokenizer model {tok.model!r} is not supported: veilnet rebuilds "
                        "byte-level BPE (tokenizer.ggml.model = 'gpt2') tokenizers")
    if tok.pre in _GPT2_REGEX_PRE:
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                       use_regex=True)
    elif tok.pre in _DIGITS_THEN_GPT2_REGEX_PRE:
        pre = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                     use_regex=True),
        ])
    else:
        raise GgufError(f"pre-tokenizer {tok.pre!r} (tokenizer.ggml.pre) is not supported: "
                        f"veilnet knows {sorted(p for p in _GPT2_REGEX_PRE if p)} and "
                        f"{sorted(_DIGITS_THEN_GPT2_REGEX_PRE)}")

    vocab = {token: i for i, token in enumerate(tok.tokens)}
    merges: list[tuple[str, str]] = []
    for m in tok.merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise GgufError(f"merge {m!r} is not two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    unk = tok.tokens[tok.unk_token_id] if tok.unk_token_id is not None else None
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                           use_regex=True)
    special = [
        AddedToken(tok.tokens[i], normalized=False, special=True)
        for i, kind in enumerate(tok.token_types)
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    ]
    for i in (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id):
        if i is not None and tok.token_types[i] not in (TOKEN_TYPE_CONTROL,
                                                        TOKEN_TYPE_USER_DEFINED):
            special.append(AddedToken(tok.tokens[i], normalized=False, special=True))
    if special:
        tokenizer.add_special_tokens(special)
    if tok.add_bos_token or tok.add_eos_token:
        tokenizer.post_processor = _post_processor(tok)
    return tokenizer


def _post_processor(tok: GgufTokenizerData) -> processors.TemplateProcessing:
    """BOS/EOS added around every sequence, as tokenizer.ggml.add_bos/eos_token ask."""
    bos = tok.bos_token_id if tok.add_bos_token else None
    eos = tok.eos_token_id if tok.add_eos_token else None

    def seq(part: str, type_id: int) -> list[str]:
        return ([f"{tok.tokens[bos]}:{type_id}"] if bos is not None else []) + \
            [f"{part}:{type_id}"] + ([f"{tok.tokens[eos]}:{type_id}"] if eos is not None else [])

    return processors.TemplateProcessing(
        single=seq("$A", 0), pair=seq("$A", 0) + seq("$B", 1),
        special_tokens=[(tok.tokens[i], i) for i in sorted({bos, eos} - {None})])


# SmolLM2's template, and ChatML templates like it: every message as
# <|im_start|>{role}\n{content}<|im_end|>\n, a default system message when the first message
# is not a system one, and <|im_start|>assistant\n when a generation prompt is asked for.
_CHATML_MESSAGE = (
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
)
_CHATML_GENERATION = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
_CHATML_DEFAULT_SYSTEM = re.compile(
    r"\{% if loop\.first and messages\[0\]\['role'\] != 'system' %\}"
    r"\{\{ '<\|im_start\|>system\n(?P<system>[^'\\]*)<\|im_end\|>\n' \}\}\{% endif %\}"
)


def _chatml_default_system(template: str) -> tuple[bool, str | None]:
    """Whether ``template`` is a ChatML template this module renders, and its default system."""
    t = template.strip()
    head, tail = "{% for message in messages %}", "{% endfor %}" + _CHATML_GENERATION
    if not (t.startswith(head) and t.endswith(tail)):
        return False, None
    body = t[len(head):-len(tail)]
    if not body.endswith(_CHATML_MESSAGE):
        return False, None
    prefix = body[:-len(_CHATML_MESSAGE)]
    if not prefix:
        return True, None
    m = _CHATML_DEFAULT_SYSTEM.fullmatch(prefix)
    return (True, m.group("system")) if m else (False, None)


def chat_prompt(template: str | None, messages: Sequence[Mapping[str, str]],
                add_generation_prompt: bool = True) -> str:
    """``messages`` ({role, content} dicts) rendered as the chat ``template`` renders them."""
    if template is None:
        raise GgufError("the model has no chat template (tokenizer.chat_template)")
    ok, default_system = _chatml_default_system(template)
    if not ok:
        raise GgufError("this chat template is not a ChatML template veilnet can render "
                        "without jinja2 (veilnet renders SmolLM2-style "
                        "<|im_start|>role ... <|im_end|> templates)")
    out: list[str] = []
    for i, message in enumerate(messages):
        try:
            role, content = message["role"], message["content"]
        except KeyError as e:
            raise GgufError(f"chat message {i} lacks {e.args[0]!r}") from e
        if not isinstance(role, str) or not isinstance(content, str):
            raise GgufError(f"chat message {i}: role and content must be strings")
        if i == 0 and default_system is not None and messages[0]["role"] != "system":
            out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
        out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
