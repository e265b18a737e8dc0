"""CIDs and the veilnet-manifest/1 format, checked against an independent CID computation."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import Manifest, ManifestError, cid_of_bytes, cid_of_file, import_minilm, is_valid_cid


def independent_cid(data: bytes) -> str:
    """CIDv1, raw codec (0x55), sha2-256 multihash (0x12, 32 bytes), multibase base32 lower."""
    raw = b"\x01\x55\x12\x20" + hashlib.sha256(data).digest()
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


def b32_cid(prefix: bytes, digest: bytes) -> str:
    return "b" + base64.b32encode(prefix + digest).decode("ascii").lower().rstrip("=")


def base58btc(data: bytes) -> str:
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = alphabet[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


# --- cid_of_bytes / cid_of_file / is_valid_cid ----------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"a",
        b"veilnet",
        np.random.default_rng(7).bytes(1 << 20),
    ],
    ids=["empty", "zero-byte", "one-byte", "word", "1MB-random"],
)
def test_cid_of_bytes_matches_independent_computation(data: bytes) -> None:
    cid = cid_of_bytes(data)
    assert cid == independent_cid(data)
    assert is_valid_cid(cid)


def test_cid_distinguishes_inputs_differing_in_one_bit() -> None:
    data = bytearray(np.random.default_rng(8).bytes(4096))
    before = cid_of_bytes(bytes(data))
    data[2000] ^= 0x01
    after = cid_of_bytes(bytes(data))
    assert before != after
    assert after == independent_cid(bytes(data))


def test_cid_of_file_matches_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(9).bytes(12345)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert cid_of_file(path) == independent_cid(data)


def _digest() -> bytes:
    return hashlib.sha256(b"x").digest()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "b",
        "bafk",
        "hello world",
        "not-a-cid-at-all",
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyk!",
        # CIDv0 (base58btc sha2-256 multihash, implicitly dag-pb)
        base58btc(b"\x12\x20" + _digest()),
        # CIDv1 with the dag-pb codec (0x70) instead of raw
        b32_cid(b"\x01\x70\x12\x20", _digest()),
        # CIDv1 with the dag-cbor codec (0x71)
        b32_cid(b"\x01\x71\x12\x20", _digest()),
        # CIDv1 raw with a sha2-512 multihash (0x13, 64 bytes)
        b32_cid(b"\x01\x55\x13\x40", hashlib.sha512(b"x").digest()),
        # CIDv1 raw sha2-256 whose digest is one byte short of its declared length
        b32_cid(b"\x01\x55\x12\x20", _digest()[:31]),
    ],
    ids=["empty", "multibase-only", "prefix", "words", "dashes", "bad-char", "cidv0",
         "dag-pb", "dag-cbor", "sha2-512", "short-digest"],
)
def test_is_valid_cid_rejects(text: str) -> None:
    assert not is_valid_cid(text)


def test_is_valid_cid_rejects_trailing_garbage_character() -> None:
    """A valid CID followed by one extra base32 character is not well-formed base32 (59 data
    characters is an impossible unpadded base32 length) and must be rejected."""
    good = independent_cid(b"x")
    assert is_valid_cid(good)
    assert not is_valid_cid(good + "a")


@pytest.mark.parametrize("value", [None, 123, b"bafk"])
def test_is_valid_cid_rejects_non_strings(value: Any) -> None:
    assert not is_valid_cid(value)


@pytest.mark.parametrize(("prefix", "length"), [
    ("z", 20_000),            # base58btc: the multiformats decoder is quadratic (old: ~5 s)
    ("Qm", 20_000),           # CIDv0 text
    ("f", 20_000),            # base16
    ("z", 5_000_000), ("b", 5_000_000), ("bafkrei", 5_000_000)])
def test_is_valid_cid_is_constant_time_on_long_strings(prefix: str, length: int) -> None:
    """Issue 12 item 1: a long fake CID froze a node (10k characters 1.5 s, 30k 26 s); the
    check now looks at type, length and alphabet before decoding anything."""
    text = prefix + "2" * length
    started = time.perf_counter()
    assert not is_valid_cid(text)
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("mutate", [
    lambda c: c.upper(), lambda c: "B" + c[1:], lambda c: c[:-1], lambda c: c[:-1] + "1",
    lambda c: c[:-1] + "=", lambda c: "bafkreh" + c[7:], lambda c: c[:30] + " " + c[31:]],
    ids=["upper", "multibase-B", "short", "digit-1", "padding", "prefix", "space"])
def test_is_valid_cid_rejects_near_misses(mutate: Any) -> None:
    good = independent_cid(b"near miss")
    assert is_valid_cid(good)
    assert not is_valid_cid(mutate(good))


def test_is_valid_cid_rejects_non_zero_padding_bits() -> None:
    """59 characters of the right alphabet whose last character carries non-zero pad bits
    decode to the same bytes as the canonical CID: only the canonical text is valid."""
    good = independent_cid(b"pad")
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    last = alphabet.index(good[-1])
    variants = [good[:-1] + alphabet[last | bits] for bits in (1, 2, 3) if last | bits != last]
    assert variants
    assert not any(is_valid_cid(v) for v in variants)


# --- shard files vs. manifest ---------------------------------------------------------------------


def _check_shards_on_disk(directory: Path) -> dict[str, Any]:
    doc = json.loads((directory / "manifest.json").read_bytes())
    for shard in doc["shards"]:
        path = directory / shard["path"]
        assert path.is_file(), path
        assert path.name == f"{shard['cid']}.onnx"
        assert independent_cid(path.read_bytes()) == shard["cid"]
    return doc


def test_minilm_shards_hash_to_their_cids(minilm_dir: Path) -> None:
    doc = _check_shards_on_disk(minilm_dir)
    assert [s["role"] for s in doc["shards"]] == ["client-head", "node", "node", "client-tail"]
    listed = {s["path"] for s in doc["shards"]}
    on_disk = {p.name for p in minilm_dir.glob("*.onnx")}
    assert on_disk == listed
    tok = doc["tokenizer"]
    assert independent_cid((minilm_dir / tok["path"]).read_bytes()) == tok["cid"]


def test_deployment_shards_hash_to_their_cids(deployment_dir: Path) -> None:
    doc = _check_shards_on_disk(deployment_dir)
    for shard in doc["shards"]:
        folder = "shards" if shard["role"] == "node" else "client"
        assert Path(shard["path"]).parent == Path(folder)
    listed = {s["path"] for s in doc["shards"]}
    on_disk = {str(p.relative_to(deployment_dir)) for p in deployment_dir.rglob("*.onnx")}
    assert on_disk == listed


@pytest.mark.parametrize("which", ["minilm", "deployment"])
def test_manifest_cid_is_cid_of_manifest_file(which: str, minilm_dir: Path,
                                              deployment_dir: Path) -> None:
    directory = minilm_dir if which == "minilm" else deployment_dir
    data = (directory / "manifest.json").read_bytes()
    manifest = Manifest.load(directory)
    assert manifest.cid == independent_cid(data)
    assert manifest.dumps() == data


def test_deployment_records_parent_manifest_cid(minilm_dir: Path, deployment_dir: Path) -> None:
    doc = json.loads((deployment_dir / "manifest.json").read_bytes())
    assert doc["parent"] == independent_cid((minilm_dir / "manifest.json").read_bytes())
    assert doc["encryption"] == "ee-encoder/1"


def test_manifest_load_round_trips(minilm_dir: Path, tmp_path: Path) -> None:
    original = (minilm_dir / "manifest.json").read_bytes()
    loaded = Manifest.load(minilm_dir / "manifest.json")
    assert loaded.path == minilm_dir / "manifest.json"
    again = Manifest.from_json(json.loads(original))
    assert again.to_json() == loaded.to_json() == json.loads(original)
    written = loaded.write(tmp_path)
    assert written.read_bytes() == original
    reloaded = Manifest.load(tmp_path)
    assert reloaded.to_json() == loaded.to_json()
    assert reloaded.shards == loaded.shards
    assert reloaded.inputs == loaded.inputs and reloaded.outputs == loaded.outputs
    assert reloaded.extra == loaded.extra


def test_minilm_import_is_deterministic(minilm_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    import_minilm(again, node_shards=2)
    first = (minilm_dir / "manifest.json").read_bytes()
    second = (again / "manifest.json").read_bytes()
    assert first == second
    for path in minilm_dir.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in minilm_dir.iterdir())


# --- Manifest.from_json rejects malformed documents ----------------------------------------------


def _doc(minilm_manifest: Manifest) -> dict[str, Any]:
    return copy.deepcopy(json.loads(minilm_manifest.dumps()))


def test_from_json_accepts_the_unmodified_document(minilm_manifest: Manifest) -> None:
    assert Manifest.from_json(_doc(minilm_manifest)).to_json() == minilm_manifest.to_json()


def _mutations() -> list[tuple[str, Any, str]]:
    def wrong_format(d: dict[str, Any]) -> None:
        d["format"] = "veilnet-manifest/2"

    def missing_format(d: dict[str, Any]) -> None:
        del d["format"]

    def unknown_role(d: dict[str, Any]) -> None:
        d["shards"][1]["role"] = "worker"

    def head_not_first(d: dict[str, Any]) -> None:
        d["shards"][0]["role"], d["shards"][1]["role"] = "node", "client-head"

    def tail_not_last(d: dict[str, Any]) -> None:
        d["shards"][-1]["role"], d["shards"][-2]["role"] = "node", "client-tail"

    def client_first(d: dict[str, Any]) -> None:
        d["shards"][0]["role"] = "client"

    def client_last(d: dict[str, Any]) -> None:
        d["shards"][-1]["role"] = "client"

    def no_node_shard(d: dict[str, Any]) -> None:
        d["shards"][1]["role"] = d["shards"][2]["role"] = "client"

    def head_in_the_middle(d: dict[str, Any]) -> None:
        d["shards"][2]["role"] = "client-head"

    def unproduced_input(d: dict[str, Any]) -> None:
        d["shards"][1]["inputs"][0]["name"] = "ghost_tensor"

    def input_from_later_shard(d: dict[str, Any]) -> None:
        later = d["shards"][2]["outputs"][0]["name"]
        d["shards"][1]["inputs"][0]["name"] = later

    def dotdot_path(d: dict[str, Any]) -> None:
        d["shards"][1]["path"] = "../escape.onnx"

    def nested_dotdot_path(d: dict[str, Any]) -> None:
        d["shards"][2]["path"] = "sub/../../escape.onnx"

    def absolute_path(d: dict[str, Any]) -> None:
        d["shards"][1]["path"] = "/etc/escape.onnx"

    def invalid_cid(d: dict[str, Any]) -> None:
        d["shards"][1]["cid"] = "bafkNOTACID"

    def cidv0(d: dict[str, Any]) -> None:
        d["shards"][2]["cid"] = base58btc(b"\x12\x20" + _digest())

    def bad_dtype(d: dict[str, Any]) -> None:
        d["shards"][0]["outputs"][0]["dtype"] = "float128"

    def bad_model_input_dtype(d: dict[str, Any]) -> None:
        d["inputs"][0]["dtype"] = "string"

    def wrong_index(d: dict[str, Any]) -> None:
        d["shards"][2]["index"] = 7

    def boolean_index(d: dict[str, Any]) -> None:  # found by tests/unit/fuzz: True == 1
        d["shards"][1]["index"] = True

    def boolean_dim(d: dict[str, Any]) -> None:  # found by tests/unit/fuzz
        d["shards"][1]["outputs"][0]["shape"][0] = True

    return [
        ("wrong-format", wrong_format, r"'format'.*veilnet-manifest/2"),
        ("missing-format", missing_format, r"'format' is None"),
        ("unknown-role", unknown_role, r"shards\[1\].*unknown role 'worker'"),
        ("head-not-first", head_not_first, r"client-head.*client-tail"),
        ("tail-not-last", tail_not_last, r"client-head.*client-tail"),
        ("client-first", client_first, r"'client' shard .* cannot be the first or last"),
        ("client-last", client_last, r"'client' shard .* cannot be the first or last"),
        ("no-node-shard", no_node_shard, r"one or more node shards.*'client', 'client'"),
        ("head-in-the-middle", head_in_the_middle,
         r"only 'node' and 'client' shards may stand between head and tail"),
        ("unproduced-input", unproduced_input, r"shard 1 input 'ghost_tensor'"),
        ("input-from-later-shard", input_from_later_shard, r"shard 1 input 'hidden_6'"),
        ("dotdot-path", dotdot_path, r"'\.\./escape\.onnx'.*inside"),
        ("nested-dotdot-path", nested_dotdot_path, r"'sub/\.\./\.\./escape\.onnx'"),
        ("absolute-path", absolute_path, r"'/etc/escape\.onnx'"),
        ("invalid-cid", invalid_cid, r"shards\[1\].*'bafkNOTACID'.*not a CIDv1"),
        ("cidv0", cidv0, r"shards\[2\].*'Qm.*not a CIDv1"),
        ("bad-dtype", bad_dtype, r"hidden_0.*unsupported dtype 'float128'"),
        ("bad-input-dtype", bad_model_input_dtype, r"input_ids.*unsupported dtype 'string'"),
        ("wrong-index", wrong_index, r"position 2 has index 7"),
        ("boolean-index", boolean_index, r"shards\[1\]: 'index' must be an integer"),
        ("boolean-dim", boolean_dim, r"shape must be a list of ints"),
    ]


@pytest.mark.parametrize(("mutate", "pattern"), [(m, p) for _, m, p in _mutations()],
                         ids=[name for name, _, _ in _mutations()])
def test_from_json_rejects(minilm_manifest: Manifest, mutate: Any, pattern: str) -> None:
    doc = _doc(minilm_manifest)
    mutate(doc)
    with pytest.raises(ManifestError, match=pattern):
        Manifest.from_json(doc)


def test_client_role_shards_between_node_shards_are_accepted(minilm_manifest: Manifest) -> None:
    """ee-decoder/1 re-bases the stream on the client between node shards: role 'client'."""
    doc = _doc(minilm_manifest)
    doc["shards"][2]["role"] = "client"
    doc["encryption"] = "ee-decoder/1"
    manifest = Manifest.from_json(doc)
    assert [s.role for s in manifest.shards] == ["client-head", "node", "client", "client-tail"]
    assert [s.index for s in manifest.node_shards] == [1]
    assert Manifest.from_json(json.loads(manifest.dumps())).to_json() == manifest.to_json()


def test_load_rejects_non_json(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(ManifestError, match="not a readable JSON manifest"):
        Manifest.load(tmp_path)
    with pytest.raises(ManifestError, match="no such manifest"):
        Manifest.load(tmp_path / "missing")


# --- verify_files ---------------------------------------------------------------------------------


def test_verify_files_clean_copy_has_no_problems(minilm_dir: Path, tmp_path: Path) -> None:
    copy_dir = tmp_path / "copy"
    shutil.copytree(minilm_dir, copy_dir)
    assert Manifest.load(copy_dir).verify_files() == []


def test_verify_files_reports_tampered_shard(minilm_dir: Path, tmp_path: Path) -> None:
    copy_dir = tmp_path / "copy"
    shutil.copytree(minilm_dir, copy_dir)
    manifest = Manifest.load(copy_dir)
    victim = manifest.shards[2]
    path = copy_dir / victim.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = manifest.verify_files()
    assert len(problems) == 1
    assert "shard 2" in problems[0]
    assert victim.cid in problems[0]
    assert independent_cid(bytes(data)) in problems[0]
    # checking only the client shards does not look at the tampered node shard
    assert manifest.verify_files(("client-head", "client-tail")) == []
    assert len(manifest.verify_files(("node",))) == 1


def test_verify_files_reports_missing_shard(minilm_dir: Path, tmp_path: Path) -> None:
    copy_dir = tmp_path / "copy"
    shutil.copytree(minilm_dir, copy_dir)
    manifest = Manifest.load(copy_dir)
    (copy_dir / manifest.shards[0].path).unlink()
    problems = manifest.verify_files()
    assert len(problems) == 1
    assert "shard 0" in problems[0] and "missing" in problems[0]
