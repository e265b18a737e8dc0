"""SecureRandom, random invertible mixers, EE keys and key files."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import stat
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crypto import (
    KEY_FORMAT,
    AttentionSpace,
    EEKey,
    KeyFormatError,
    PermSpace,
    SecureRandom,
    random_invertible,
)

SCHEME = "ee-encoder/1"


def independent_cid(data: bytes) -> str:
    raw = b"\x01\x55\x12\x20" + hashlib.sha256(data).digest()
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


# --- SecureRandom --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2**255, b"some seed bytes"])
def test_same_seed_same_stream(seed: int | bytes) -> None:
    a, b = SecureRandom(seed), SecureRandom(seed)
    assert a.bytes(100) == b.bytes(100)
    np.testing.assert_array_equal(a.uniform(50), b.uniform(50))
    np.testing.assert_array_equal(a.permutation(30), b.permutation(30))
    np.testing.assert_array_equal(a.normal(9), b.normal(9))


def test_different_seeds_differ() -> None:
    streams = [SecureRandom(s).bytes(32) for s in (0, 1, 2, 12345, b"a", b"b")]
    assert len(set(streams)) == len(streams)


def test_unseeded_instances_differ() -> None:
    assert SecureRandom().bytes(32) != SecureRandom().bytes(32)
    assert not np.array_equal(SecureRandom().permutation(50), SecureRandom().permutation(50))


def test_stream_continues_rather_than_repeats() -> None:
    rng = SecureRandom(3)
    assert rng.bytes(32) != rng.bytes(32)


def test_byte_histogram_is_flat() -> None:
    data = np.frombuffer(SecureRandom(4).bytes(256 * 400), dtype=np.uint8)
    counts = np.bincount(data, minlength=256)
    chi2 = float(((counts - 400.0) ** 2 / 400.0).sum())
    assert chi2 < 400  # 255 degrees of freedom: mean 255, sd ~22.6


@pytest.mark.parametrize("n", [0, 1, 2, 5, 97, 1000])
def test_permutation_is_a_permutation(n: int) -> None:
    perm = SecureRandom(n).permutation(n)
    assert perm.shape == (n,)
    assert perm.dtype == np.int64
    assert sorted(perm.tolist()) == list(range(n))


def test_large_permutation_is_not_identity() -> None:
    perm = SecureRandom(6).permutation(1000)
    assert (perm != np.arange(1000)).sum() > 900


def test_uniform_range_and_moments() -> None:
    u = SecureRandom(7).uniform((200, 50))
    assert u.shape == (200, 50)
    assert u.dtype == np.float64
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01  # sd of the mean ~0.004
    assert abs(u.var() - 1 / 12) < 0.005
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert hist.min() > 850 and hist.max() < 1150  # expected 1000 each, sd ~30
    assert len(np.unique(u)) == u.size


def test_normal_moments() -> None:
    z = SecureRandom(8).normal(20001)  # odd size
    assert z.shape == (20001,)
    assert np.isfinite(z).all()
    assert abs(z.mean()) < 0.03
    assert abs(z.std() - 1.0) < 0.03


def test_permutations_are_unbiased() -> None:
    rng = SecureRandom(2026)
    n, draws = 5, 2000
    counts = np.zeros((n, n), dtype=np.int64)  # [position, value]
    seen: Counter[tuple[int, ...]] = Counter()
    for _ in range(draws):
        perm = rng.permutation(n)
        counts[np.arange(n), perm] += 1
        seen[tuple(perm.tolist())] += 1
    expected = draws / n  # 400; sd ~17.9
    assert np.abs(counts - expected).max() < 90
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60  # 16 degrees of freedom
    # every one of the 120 permutations shows up (expected ~16.7 times each)
    assert set(seen) == set(itertools.permutations(range(n)))
    assert max(seen.values()) < 45


# --- random_invertible ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 8, 32, 64])
def test_random_invertible_is_well_conditioned(n: int) -> None:
    rng = SecureRandom(100 + n)
    for _ in range(5):
        m = random_invertible(rng, n)
        assert m.shape == (n, n)
        sv = np.linalg.svd(m, compute_uv=False)
        assert sv.min() >= 0.5 - 1e-9 and sv.max() <= 2.0 + 1e-9
        assert np.linalg.cond(m) <= 4 + 1e-9
        np.testing.assert_allclose(m @ np.linalg.inv(m), np.eye(n), atol=1e-10)


def test_random_invertible_is_not_trivial() -> None:
    m = random_invertible(SecureRandom(9), 16)
    off_diagonal = m - np.diag(np.diag(m))
    assert np.abs(off_diagonal).max() > 0.05
    assert not np.allclose(m @ m.T, np.eye(16), atol=1e-3)  # mixes scale too, not just rotates


# --- EEKey.generate ------------------------------------------------------------------------------


PERMS = {"hidden": 12, "ffn/1/x": 7}
ATTN = {"attn/1/a": (4, 3), "attn/1/b": (2, 5)}


def _key(seed: int | None = 5) -> EEKey:
    return EEKey.generate(SCHEME, PERMS, ATTN, seed=seed)


def test_generate_creates_all_spaces() -> None:
    key = _key()
    assert key.scheme == SCHEME
    assert set(key.spaces) == set(PERMS) | set(ATTN)
    for sid, size in PERMS.items():
        space = key.perm(sid)
        assert isinstance(space, PermSpace)
        assert sorted(space.perm.tolist()) == list(range(size))
    for sid, (heads, dim) in ATTN.items():
        att = key.attention(sid)
        assert isinstance(att, AttentionSpace)
        assert sorted(att.head_perm.tolist()) == list(range(heads))
        assert att.r.shape == att.s.shape == (heads, dim, dim)
    with pytest.raises(KeyError):
        key.perm("attn/1/a")
    with pytest.raises(KeyError):
        key.attention("hidden")


def test_generate_is_reproducible_only_with_a_seed() -> None:
    assert _key(5).to_json() == _key(5).to_json()
    assert _key(5).to_json() != _key(6).to_json()
    assert _key(None).to_json() != _key(None).to_json()


def test_perm_space_encrypt_decrypt() -> None:
    space = _key().perm("hidden")
    x = np.random.default_rng(1).standard_normal((3, 12))
    enc = space.encrypt(x)
    for j in range(12):
        np.testing.assert_array_equal(enc[:, j], x[:, space.perm[j]])
    np.testing.assert_array_equal(space.decrypt(enc), x)
    np.testing.assert_array_equal(space.perm[space.inverse], np.arange(12))


@pytest.mark.parametrize("sid", list(ATTN))
@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_attention_matrix_times_inverse_is_identity(sid: str, kind: str) -> None:
    att = _key().attention(sid)
    n = att.heads * att.head_dim
    t, t_inv = att.matrix(kind), att.inverse_matrix(kind)
    assert t.shape == t_inv.shape == (n, n)
    np.testing.assert_allclose(t @ t_inv, np.eye(n), atol=1e-10)
    np.testing.assert_allclose(t_inv @ t, np.eye(n), atol=1e-10)
    np.testing.assert_allclose(t_inv, np.linalg.inv(t), atol=1e-9)


def test_attention_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        _key().attention("attn/1/a").matrix("o")


@pytest.mark.parametrize("sid", list(ATTN))
def test_query_key_products_are_preserved_per_permuted_head(sid: str) -> None:
    att = _key().attention(sid)
    heads, d = att.heads, att.head_dim
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((6, heads * d)), rng.standard_normal((6, heads * d))
    xq, yk = x @ att.matrix("q"), y @ att.matrix("k")
    pi = att.head_perm
    for j in range(heads):
        enc = np.einsum("bi,bi->b", xq[:, j * d:(j + 1) * d], yk[:, j * d:(j + 1) * d])
        src = slice(pi[j] * d, (pi[j] + 1) * d)
        plain = np.einsum("bi,bi->b", x[:, src], y[:, src])
        np.testing.assert_allclose(enc, plain, rtol=1e-10, atol=1e-10)
    # the transformed vectors themselves are not the plaintext ones
    assert not np.allclose(xq, x)
    assert not np.allclose(np.sort(xq, axis=1), np.sort(x, axis=1))


@pytest.mark.parametrize("sid", list(ATTN))
def test_value_space_block_j_depends_only_on_head_pi_j(sid: str) -> None:
    att = _key().attention(sid)
    heads, d = att.heads, att.head_dim
    t_v = att.matrix("v")
    x = np.random.default_rng(3).standard_normal(heads * d)
    for h in range(heads):
        bumped = x.copy()
        bumped[h * d:(h + 1) * d] += 1.0
        changed = np.abs(bumped @ t_v - x @ t_v).reshape(heads, d).max(axis=1) > 1e-12
        j = int(np.flatnonzero(att.head_perm == h)[0])
        assert changed.tolist() == [i == j for i in range(heads)]


# --- key files -----------------------------------------------------------------------------------


def test_save_mode_0600_and_no_overwrite(tmp_path: Path) -> None:
    key = _key()
    path = tmp_path / "key.json"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        _key(6).save(path)
    assert path.read_bytes() == before


def test_load_save_round_trip_is_exact(tmp_path: Path) -> None:
    key = _key()
    key.deployment = independent_cid(b"some manifest")
    path = tmp_path / "key.json"
    key.save(path)
    loaded = EEKey.load(path)
    assert loaded.scheme == key.scheme
    assert loaded.deployment == key.deployment
    assert list(loaded.spaces) == list(key.spaces)
    for sid, space in key.spaces.items():
        other = loaded.spaces[sid]
        assert type(other) is type(space)
        if isinstance(space, PermSpace):
            assert isinstance(other, PermSpace)
            np.testing.assert_array_equal(other.perm, space.perm)
        else:
            assert isinstance(other, AttentionSpace)
            np.testing.assert_array_equal(other.head_perm, space.head_perm)
            assert other.r.tobytes() == space.r.tobytes()  # bit-exact
            assert other.s.tobytes() == space.s.tobytes()
    assert loaded.to_json() == key.to_json()


def _valid_doc() -> dict[str, Any]:
    return json.loads(json.dumps(_key().to_json()))


def _bad_key_files() -> list[tuple[str, bytes]]:
    def doc_with(mutate: Any) -> bytes:
        doc = _valid_doc()
        mutate(doc)
        return json.dumps(doc).encode()

    def set_perm(doc: dict[str, Any]) -> None:
        doc["spaces"]["hidden"]["perm"] = [0] * 12

    def set_head_perm(doc: dict[str, Any]) -> None:
        doc["spaces"]["attn/1/a"]["head_perm"] = [0, 1, 2, 4]

    def set_perm_2d(doc: dict[str, Any]) -> None:
        doc["spaces"]["hidden"]["perm"] = [[0, 1], [1, 0]]

    def set_type(doc: dict[str, Any]) -> None:
        doc["spaces"]["hidden"]["type"] = "rotation"

    def set_dtype(doc: dict[str, Any]) -> None:
        doc["spaces"]["attn/1/a"]["r"]["dtype"] = "float16"

    def drop_spaces(doc: dict[str, Any]) -> None:
        del doc["spaces"]

    def spaces_list(doc: dict[str, Any]) -> None:
        doc["spaces"] = [1, 2]

    return [
        ("text-garbage", b"this is not a key"),
        ("empty", b""),
        ("binary-garbage", np.random.default_rng(12).bytes(256)),
        ("json-list", b"[1, 2, 3]"),
        ("json-string", b'"veilnet-ee-key/1"'),
        ("wrong-format", json.dumps({**_valid_doc(), "format": "veilnet-ee-key/0"}).encode()),
        ("no-format", json.dumps({"scheme": SCHEME, "spaces": {}}).encode()),
        ("non-permutation", doc_with(set_perm)),
        ("non-permutation-heads", doc_with(set_head_perm)),
        ("2d-permutation", doc_with(set_perm_2d)),
        ("unknown-space-type", doc_with(set_type)),
        ("bad-array-dtype", doc_with(set_dtype)),
        ("no-spaces", doc_with(drop_spaces)),
        ("spaces-not-an-object", doc_with(spaces_list)),
    ]


@pytest.mark.parametrize("data", [d for _, d in _bad_key_files()],
                         ids=[name for name, _ in _bad_key_files()])
def test_load_rejects_bad_key_files(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "key.json"
    path.write_bytes(data)
    with pytest.raises(KeyFormatError):
        EEKey.load(path)


def _key_doc_with(change: Any) -> dict[str, Any]:
    doc = EEKey.generate(SCHEME, {"hidden": 4}, {"attn": (2, 2)}, seed=3).to_json()
    change(doc)
    return doc


@pytest.mark.parametrize("data", [
    json.dumps(_key_doc_with(lambda d: d["spaces"]["hidden"].update(perm=[0, 1, 2, 2**64]))),
    json.dumps(_key_doc_with(lambda d: d["spaces"]["attn"]["r"].update(shape=[10**30]))),
    "[" * 100_000 + "]" * 100_000,
    json.dumps({"format": "veilnet-ee-decoder-key/1", "scheme": "ee-decoder/1",
                "dims": {"d_model": 2, "n_heads": 1, "n_kv_heads": 0, "head_dim": 2, "ffn": 2},
                "shards": [], "layers": {"0": {"q_perm": [[0]], "rope_factor": {}}}}),
], ids=["perm-value-over-int64", "huge-shape", "nested-100k-deep", "decoder-zero-kv-heads"])
def test_key_file_errors_found_by_fuzzing(tmp_path: Path, data: str) -> None:
    """Found by tests/unit/fuzz/test_fuzz_manifest_config.py: OverflowError, RecursionError and
    ZeroDivisionError escaped load_key_file instead of KeyFormatError."""
    from models import DecoderKey

    path = tmp_path / "key.json"
    path.write_text(data)
    for load in (EEKey.load, DecoderKey.load):
        with pytest.raises(KeyFormatError, match=r"key\.json"):
            load(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFormatError, match="missing"):
        EEKey.load(tmp_path / "missing.json")


# --- the MiniLM deployment's key -----------------------------------------------------------------


def test_deployment_key_file(deployment_dir: Path) -> None:
    path = deployment_dir / "client" / "key.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((deployment_dir / "client").stat().st_mode) & 0o077 == 0
    doc = json.loads(path.read_bytes())
    assert doc["format"] == KEY_FORMAT
    manifest_bytes = (deployment_dir / "manifest.json").read_bytes()
    assert doc["deployment"] == independent_cid(manifest_bytes)
    assert doc["scheme"] == json.loads(manifest_bytes)["encryption"]

    key = EEKey.load(path)
    hidden = key.perm("hidden").perm
    assert sorted(hidden.tolist()) == list(range(384))
    assert not np.array_equal(hidden, np.arange(384))
    attention = [s for s in key.spaces.values() if isinstance(s, AttentionSpace)]
    assert len(attention) == 6  # one per MiniLM layer
    for att in attention:
        assert (att.heads, att.head_dim) == (12, 32)
        for mix in (*att.r, *att.s):
            assert np.linalg.cond(mix) <= 4 + 1e-9


def test_deployment_key_is_not_in_the_manifest(deployment_dir: Path) -> None:
    key_doc = json.loads((deployment_dir / "client" / "key.json").read_bytes())
    manifest_text = (deployment_dir / "manifest.json").read_text()
    hidden_perm = json.dumps(key_doc["spaces"]["hidden"]["perm"])
    assert hidden_perm not in manifest_text
    assert "key.json" not in manifest_text
