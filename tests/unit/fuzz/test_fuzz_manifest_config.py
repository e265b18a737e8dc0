"""Fuzzing the files veilnet reads: deployment manifests (models/manifest.py: ManifestError; a
manifest also arrives from peers over /veilnet/shard/1), identity key files
(crypto/identity.py: IdentityError), EE key files (crypto/ee_key.py and the ee-decoder key of
models/ee_decoder_key.py: KeyFormatError) and node config files (node/config.py: ConfigError).
Each starts from a valid file written by the project's own writers."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fuzzkit import budget, check, mutated_bytes, mutated_text, mutated_tree
from hypothesis import given
from hypothesis import strategies as st

from crypto.ee_key import EEKey, KeyFormatError
from crypto.identity import Identity, IdentityError
from models import DecoderKey, Manifest, ManifestError, ShardSpec, TensorSpec, cid_of_bytes
from models.ee_decoder_key import DecoderDims
from node.config import ConfigError, load_config

DIR = Path(tempfile.mkdtemp(prefix="veilnet-fuzz-files-"))
atexit.register(shutil.rmtree, DIR, True)


def shard(index: int, role: str, inputs: list[TensorSpec],
          outputs: list[TensorSpec]) -> ShardSpec:
    cid = cid_of_bytes(f"shard {index}".encode())
    return ShardSpec(index, cid, role, f"shards/{cid}.onnx", tuple(inputs), tuple(outputs),
                     size=1000 + index)


IDS = TensorSpec("input_ids", "int64", ("batch", "seq"))
MASK = TensorSpec("attention_mask", "int64", ("batch", "seq"))
H0, H1 = (TensorSpec(f"h{i}", "float32", ("batch", "seq", 8)) for i in range(2))
OUT = TensorSpec("embedding", "float32", ("batch", 8))
MANIFEST = Manifest("fuzz-model", "ee-encoder/1", (IDS, MASK), (OUT,), [
    shard(0, "client-head", [IDS], [H0]), shard(1, "node", [H0, MASK], [H1]),
    shard(2, "client-tail", [H1, MASK], [OUT])], extra={"tokenizer": "tokenizer.json"})
MANIFEST_BYTES = MANIFEST.dumps()
MANIFEST_DOC = json.loads(MANIFEST_BYTES)

PEM = Identity.from_seed(b"\x09" * 32).private_key().private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
EC_PEM = ec.generate_private_key(ec.SECP256R1()).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

EE_KEY = EEKey.generate("ee-encoder/1", {"hidden": 8, "ffn": 6}, {"attn": (2, 3)}, seed=1)
EE_KEY.deployment = MANIFEST.cid
EE_DOC = EE_KEY.to_json()
DEC_KEY = DecoderKey.generate(DecoderDims(8, 4, 2, 2, 6), [(1, [0, 1])], seed=2)
DEC_DOC = DEC_KEY.to_json()

CONFIG = """\
data_dir = "node1"
listen = ["/ip4/127.0.0.1/tcp/4001"]
http = "127.0.0.1:8401"
bootstrap = ["/ip4/127.0.0.1/tcp/4002/p2p/12D3KooWHFd1gyNYFqxt7ke9FY2VoVVWY2XSPhvL9vg2pB6wQGfa"]
capacity = 2
threads = 0
frame_limit = 67108864
shard_size_limit = 1073741824
request_timeout = 60
idle_timeout = 30.5
announce_interval = 10
max_sessions = 16
max_context = 2048
session_expiry = 300
domain = "node1.example.org"
ledger = true
record_max_mb = 1024
log_level = "info"
"""


def written(name: str, data: bytes | str) -> Path:
    path = DIR / name
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return path


def test_valid_files_pass() -> None:
    assert Manifest.from_json_bytes(MANIFEST_BYTES).cid == MANIFEST.cid
    assert Identity.load(written("id.pem", PEM)).peer_id
    assert EEKey.load(written("ee.json", json.dumps(EE_DOC))).deployment == MANIFEST.cid
    assert DecoderKey.load(written("dec.json", json.dumps(DEC_DOC))).shards
    assert load_config(written("node.toml", CONFIG), {}).capacity == 2


# -- manifests ----------------------------------------------------------------------------------

@budget(125)
@given(mutated_tree(MANIFEST_DOC, binary=False))
def test_manifest_from_json(doc: Any) -> None:
    got = check("manifest.from_json", Manifest.from_json, doc, errors=ManifestError)
    if got:
        check("manifest.dumps", got.dumps, errors=())
        # JSON true is not the integer 1: an accepted manifest holds no boolean as a number
        for s in got.shards:
            assert type(s.index) is int, s.index
            for t in (*s.inputs, *s.outputs):
                assert not any(isinstance(d, bool) for d in t.shape), t


@budget(100)
@given(st.one_of(mutated_bytes(MANIFEST_BYTES), st.binary(max_size=100)))
def test_manifest_from_json_bytes(data: bytes) -> None:
    check("manifest.from_json_bytes", Manifest.from_json_bytes, data, errors=ManifestError)


@budget(30)
@given(mutated_bytes(MANIFEST_BYTES))
def test_manifest_load(data: bytes) -> None:
    check("manifest.load", Manifest.load, written("manifest.json", data), errors=ManifestError)


# -- key files ----------------------------------------------------------------------------------

@budget(75)
@given(st.one_of(mutated_bytes(PEM), mutated_bytes(EC_PEM, max_ops=1),
                 mutated_text(PEM.decode()).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_identity_load(pem: bytes) -> None:
    check("identity.load", Identity.load, written("id.pem", pem), errors=IdentityError)


@budget(100)
@given(st.one_of(mutated_tree(EE_DOC, binary=False), mutated_text(json.dumps(EE_DOC))))
def test_ee_key_load(doc: Any) -> None:
    try:
        text = doc if isinstance(doc, str) else json.dumps(doc)
    except (ValueError, TypeError, RecursionError):
        return
    check("ee_key.load", EEKey.load, written("ee.json", text), errors=KeyFormatError)


@budget(75)
@given(st.one_of(mutated_tree(DEC_DOC, binary=False), mutated_text(json.dumps(DEC_DOC))))
def test_decoder_key_load(doc: Any) -> None:
    try:
        text = doc if isinstance(doc, str) else json.dumps(doc)
    except (ValueError, TypeError, RecursionError):
        return
    check("ee_decoder_key.load", DecoderKey.load, written("dec.json", text),
          errors=KeyFormatError)


# -- node config --------------------------------------------------------------------------------

TOML_VALUE_LIST = [
    "0", "-1", "1", "nan", "inf", "-inf", "+nan", "1e400", "9223372036854775807",
    "9223372036854775808", "0x10", "true", "false", '""', '"x"', '"\\u0000"', '"a:²"',
    '"127.0.0.1:٣"', '"::1"', '"127.0.0.1:99999"', "[]", '["a", 1]', "[[]]", "{}", "{a = 1}",
    "1979-05-27T07:32:00Z", '"node1/\\u0000"', '"' + "a" * 5000 + '"', '"DEBUG"', '"ERROR "']
TOML_VALUES = st.sampled_from(TOML_VALUE_LIST)


@st.composite
def config_files(draw: st.DrawFn) -> str:
    """The valid config with values swapped for TOML edge cases, lines dropped or added."""
    lines = CONFIG.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        key = lines[i].split(" = ", 1)[0]
        op = draw(st.sampled_from(["value", "value", "drop", "unknown", "text"]))
        if op == "value":
            lines[i] = f"{key} = {draw(TOML_VALUES)}"
        elif op == "drop":
            del lines[i]
        elif op == "unknown":
            lines.append(f"{draw(st.sampled_from(['colour', 'listen', 'data_dir']))} = 1")
        else:
            lines[i] = draw(mutated_text(lines[i], max_ops=2))
    return "\n".join(lines) + "\n"


@budget(125)
@given(st.one_of(config_files(), mutated_bytes(CONFIG.encode())))
def test_load_config(text: str | bytes) -> None:
    got = check("config.load_config", load_config, written("node.toml", text), {},
                errors=ConfigError)
    if got:
        for name in ("request_timeout", "idle_timeout", "announce_interval", "session_expiry"):
            value = getattr(got, name)
            assert value == value and 0 < value < float("inf"), f"{name} = {value!r} accepted"


def test_load_config_every_key_with_every_edge_value() -> None:
    """Exhaustive rather than sampled: each key of the config set to each TOML edge case (a
    random draw hits one pair in hundreds: ``http = "a:²"`` and ``announce_interval = nan``
    slipped through the sampled target)."""
    keys = [line.split(" = ", 1)[0] for line in CONFIG.splitlines()]
    for value in TOML_VALUE_LIST:
        for key in keys:
            text = "".join(line + "\n" if not line.startswith(f"{key} = ") else
                           f"{key} = {value}\n" for line in CONFIG.splitlines())
            got = check("config.load_config[key x value]", load_config,
                        written("node.toml", text), {}, errors=ConfigError)
            if got:
                for name in ("request_timeout", "idle_timeout", "announce_interval",
                             "session_expiry"):
                    timeout = getattr(got, name)
                    assert timeout == timeout and 0 < timeout < float("inf"), (key, value)
