"""What every audit shares (models/audit.py for ee-encoder/1 and ee-decoder/1,
models/audit_masked.py for masked/1, models/audit_views.py for recorded views): the report and
its rows, the held-out text and the best constant guess, the plaintext model a deployment was
made from, and ``timed`` (one row, timed).
"""

from __future__ import annotations

import random
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from errors import InputError
from models.importer import Progress
from models.manifest import EE_DECODER, EE_ENCODER, MASKED, Manifest

MAX_TOKENS = 64  # held-out sentences are truncated to this many tokens
KNOWN_MODELS = ("all-MiniLM-L6-v2", "SmolLM2-135M-Instruct")



class AuditError(InputError):
    """A deployment the audit cannot run on (no key, plaintext, unknown model)."""


@dataclass
class AuditRow:
    attack: str
    target: str
    success: float
    baseline: float
    detail: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    source: str = "simulated"  # "views": run on a --record-received directory (audit_views)

    def verdict(self) -> str:
        pct = f"{100 * self.success:.1f}%"
        base = f"{100 * self.baseline:.1f}%"
        note = f" - {self.detail['note']}" if self.detail.get("note") else ""
        if self.detail.get("applicable") is False:
            return f"{self.target}: {self.detail.get('note', 'not applicable')}"
        if self.target == "input tokens":
            who = {"keyless": "a node without the key", "collusion": "two colluding nodes",
                   "averaging": "a node averaging repeated queries"}.get(
                self.attack.split(" ")[0].rstrip(":"), "a node with the public weights")
            return f"{who} reads {pct} of input tokens (best constant guess {base}){note}"
        if self.target == "sequence length":
            return (f"a node reads the exact token count of {pct} of texts "
                    f"(best constant guess {base}){note}")
        return f"a node with the public weights recovers {pct} of the {self.target} " \
               f"(random guess {base})"


@dataclass
class AuditReport:
    deployment: str
    scheme: str
    rows: list[AuditRow] = field(default_factory=list)
    views: dict[str, Any] | None = None  # --views: what was recorded, attacked or not
    bound: dict[str, Any] | None = None  # masked/1: the information bound of the manifest

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"deployment": self.deployment, "scheme": self.scheme,
                               "rows": [asdict(r) for r in self.rows]}
        doc.update({k: v for k, v in (("views", self.views), ("bound", self.bound)) if v})
        return doc

    def row(self, attack: str, target: str) -> AuditRow:
        return next(r for r in self.rows if r.attack == attack and r.target == target)

    def table(self) -> str:
        w = max([34, *(len(r.attack) for r in self.rows)])
        lines = [f"deployment {self.deployment} ({self.scheme})", "",
                 f"{'attack':{w}} {'target':22} {'success':>8} {'baseline':>9} {'seconds':>8}"]
        for r in self.rows:
            lines.append(f"{r.attack:{w}} {r.target:22} {r.success:8.4f} {r.baseline:9.4f} "
                         f"{r.seconds:8.2f}")
        lines.append("")
        lines += [f"- {r.attack}: {r.verdict()}" for r in self.rows]
        lines += [f"- not scored: {why}" for why in (self.views or {}).get("unscored", [])]
        if self.bound:
            lines.append(f"- information bound: at most {self.bound['bits_per_token_per_query']:g}"
                         f" bits per token per query over its {self.bound['views_per_row']} "
                         f"views ({self.bound['formula']})")
        return "\n".join(lines)


# --- held-out text --------------------------------------------------------------------------------

def heldout_sentences(n: int = 200, seed: int = 15) -> list[str]:
    """A deterministic sample of ``n`` sentences of the Python help texts shipped with Python
    (``pydoc_data.topics``): prose, some code, never downloaded."""
    from pydoc_data.topics import topics

    found = set()
    for text in topics.values():
        for part in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if 30 <= len(part) <= 300 and sum(c.isalpha() for c in part) > len(part) / 2:
                found.add(part)
    pool = sorted(found)
    return random.Random(seed).sample(pool, min(n, len(pool)))


def most_common_rate(tokens: np.ndarray) -> float:
    """The best constant guess: the frequency of the most common value."""
    return Counter(tokens.tolist()).most_common(1)[0][1] / tokens.size if tokens.size else 0.0


def special_ids(tokenizer_path: Path) -> set[int]:
    tok = Tokenizer.from_file(str(tokenizer_path))
    return {i for i, t in tok.get_added_tokens_decoder().items() if t.special}


# --- inputs ---------------------------------------------------------------------------------------

def load_key(deploy: Manifest) -> Path:
    """DEPLOY/client/key.json of an EE deployment (the audit scores with the real key)."""
    assert deploy.path is not None
    if deploy.encryption == "none":
        raise AuditError(f"{deploy.path}: nothing to attack: nodes see plaintext "
                         "(encryption: none)")
    if deploy.encryption not in (EE_ENCODER, EE_DECODER):
        raise AuditError(f"{deploy.path}: no audit for encryption {deploy.encryption!r} "
                         f"(only {EE_ENCODER}, {EE_DECODER} and {MASKED})")
    key = deploy.path.parent / "client" / "key.json"
    if not key.is_file():
        raise AuditError(f"{key} not found: the audit scores the attacks against the real key, "
                         "so run it where the deployment owner keeps DEPLOY/client/")
    return key


@contextmanager
def plain_model(deploy: Manifest, model_dir: Path | None,
                 progress: Progress) -> Iterator[Manifest]:
    """The plaintext model the deployment was encrypted from: ``model_dir``, or re-imported from
    its package when the manifest names MiniLM or SmolLM2."""
    with tempfile.TemporaryDirectory(prefix="veilnet-audit-") as tmp:
        if model_dir is None:
            out = Path(tmp) / "model"
            shards = 1 if deploy.encryption == MASKED else len(deploy.node_shards)
            progress(f"re-importing {deploy.name} from its package")
            if deploy.name == KNOWN_MODELS[0]:
                from models import import_minilm

                import_minilm(out, shards)
            elif deploy.name == KNOWN_MODELS[1]:
                from models.llama_import import import_smollm2

                import_smollm2(out, shards)
            else:
                raise AuditError(f"{deploy.name}: pass the plaintext model with --model (only "
                                 f"{' and '.join(KNOWN_MODELS)} are re-imported)")
            model_dir = out
        plain = Manifest.load(Path(model_dir))
        if plain.encryption != "none":
            raise AuditError(f"{plain.path}: --model must be the plaintext model, not a "
                             "deployment")
        # masked/1 uses the weights only: any split of the same weights will do
        src = [(m.extra.get("source") or {}).get("weights_cid") for m in (plain, deploy)]
        same = deploy.encryption == MASKED and src[0] is not None and src[0] == src[1]
        if deploy.extra.get("parent") not in (None, plain.cid) and not same:
            raise AuditError(f"{plain.path} is not the model {deploy.path} was encrypted from "
                             f"(its parent is {deploy.extra.get('parent')}, this is {plain.cid})")
        yield plain


def client_file(deploy: Manifest, name: str) -> Path:
    assert deploy.path is not None  # loaded from a file
    return deploy.path.parent / str(deploy.extra[name]["path"])


def timed(report: AuditReport, progress: Progress, attack: str, target: str,
           fn: Callable[[], tuple[float, float, dict[str, Any]]]) -> None:
    progress(f"{attack}: {target}")
    start = time.perf_counter()
    success, baseline, detail = fn()
    report.rows.append(AuditRow(attack, target, float(success), float(baseline), detail,
                                round(time.perf_counter() - start, 3)))


def no_views_error(dirs: Sequence[Path], deploy: Manifest, found: Iterable[str]) -> AuditError:
    """The error for recordings in ``dirs`` that hold no view of ``deploy``'s node shards,
    naming the shards they do hold (``found``)."""
    shards = sorted(set(found))
    return AuditError(f"{', '.join(map(str, dirs))}: no recorded views of this deployment's "
                      f"node shards ({', '.join(s.cid for s in deploy.node_shards)}); shards "
                      f"found: {', '.join(shards) if shards else 'none (no views)'}")


__all__ = ["KNOWN_MODELS", "MAX_TOKENS", "AuditError", "AuditReport", "AuditRow", "client_file",
           "heldout_sentences", "load_key", "most_common_rate", "no_views_error", "plain_model",
           "special_ids", "timed"]
