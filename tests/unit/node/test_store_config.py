"""node/store.py (what a node stores from a deployment) and node/config.py (its settings)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from models import Manifest, cid_of_bytes, cid_of_file
from node.config import DEFAULT_SHARD_SIZE_LIMIT, ConfigError, NodeConfig, load_config
from node.daemon import load_or_create_api_token
from node.store import MANIFEST_LIMIT, ShardStore, StoreError, check_data_dir
from protocols.wire import DEFAULT_FRAME_LIMIT


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def deploy_copy(deployment_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session deployment that a test may damage."""
    out = tmp_path / "deploy"
    shutil.copytree(deployment_dir, out)
    return out


# -- ShardStore -----------------------------------------------------------------------------------

def test_add_deployment_installs_node_shards_only(deployment_dir: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(deployment_dir)
    node_cids = sorted(s.cid for s in manifest.node_shards)
    client_cids = [s.cid for s in manifest.shards if s.role != "node"]
    assert len(node_cids) == 2 and len(client_cids) == 2

    store = ShardStore(tmp_path / "D")
    mcid, installed = store.add_deployment(deployment_dir)

    assert mcid == cid_of_file(deployment_dir / "manifest.json")
    assert sorted(installed) == node_cids
    files = all_files(tmp_path / "D")
    rel = sorted(str(p.relative_to(tmp_path / "D")) for p in files)
    assert rel == sorted([f"deployments/{mcid}.json", *(f"shards/{c}.onnx" for c in node_cids)])
    # every stored file hashes to the CID it is named after
    for path in files:
        assert cid_of_file(path) == path.name.split(".")[0]
    # no client material under any name: no key, tokenizer, client dir, head or tail shard
    client_hashes = {hashlib.sha256(p.read_bytes()).digest()
                     for p in all_files(deployment_dir / "client")}
    for path in files:
        assert hashlib.sha256(path.read_bytes()).digest() not in client_hashes, path
        assert not any(c in str(path) for c in client_cids), path
    assert not any(p.name in {"key.json", "tokenizer.json"} for p in files)
    assert not (tmp_path / "D" / "client").exists()

    shards = store.shards()
    assert sorted(shards) == node_cids
    for cid, shard in shards.items():
        assert shard.deployment == mcid and shard.model == manifest.name
        assert shard.spec.role == "node" and shard.path == store.shard_path(cid)
    assert store.blob_path(client_cids[0]) is None
    assert store.blob_path(mcid) == store.manifest_path(mcid)


def test_add_deployment_is_idempotent_and_honours_only(deployment_dir: Path,
                                                       tmp_path: Path) -> None:
    manifest = Manifest.load(deployment_dir)
    first, second = (s.cid for s in manifest.node_shards)
    store = ShardStore(tmp_path / "D")
    _, installed = store.add_deployment(deployment_dir, only=[second])
    assert installed == [second]
    assert sorted(store.shards()) == [second]
    _, installed = store.add_deployment(deployment_dir)
    assert sorted(installed) == sorted([first, second])
    _, again = store.add_deployment(deployment_dir)  # nothing to do, nothing broken
    assert sorted(again) == sorted(installed)
    assert len(all_files(tmp_path / "D")) == 3


@pytest.mark.parametrize("role", ["client-head", "client-tail"])
def test_only_a_client_shard_is_refused(deployment_dir: Path, tmp_path: Path, role: str) -> None:
    manifest = Manifest.load(deployment_dir)
    client = next(s.cid for s in manifest.shards if s.role == role)
    store = ShardStore(tmp_path / "D")
    with pytest.raises(StoreError, match="client") as info:
        store.add_deployment(deployment_dir, only=[client])
    assert client in str(info.value)
    assert list((tmp_path / "D" / "shards").iterdir()) == []
    assert store.shards() == {}


def test_only_an_unknown_cid_is_refused(deployment_dir: Path, tmp_path: Path) -> None:
    unknown = cid_of_bytes(b"no such shard")
    with pytest.raises(StoreError, match=unknown):
        ShardStore(tmp_path / "D").add_deployment(deployment_dir, only=[unknown])


def test_tampered_shard_is_refused_and_not_stored(deploy_copy: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(deploy_copy)
    victim = manifest.node_shards[1]
    path = deploy_copy / victim.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, same name, one byte changed
    path.write_bytes(bytes(data))

    store = ShardStore(tmp_path / "D")
    with pytest.raises(StoreError, match=victim.cid):
        store.add_deployment(deploy_copy)
    assert not store.shard_path(victim.cid).exists()
    assert victim.cid not in store.shards()
    leftovers = [p.name for p in all_files(tmp_path / "D") if p.name.startswith(".incoming")]
    assert leftovers == []
    # only the untouched shard may have been stored, and it is intact
    for stored in (tmp_path / "D" / "shards").iterdir():
        assert cid_of_file(stored) == stored.stem != victim.cid


def test_missing_manifest_names_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-deployment"
    empty.mkdir()
    with pytest.raises(StoreError) as info:
        ShardStore(tmp_path / "D").add_deployment(empty)
    assert str(empty / "manifest.json") in str(info.value)


def test_missing_shard_file_names_the_path(deploy_copy: Path, tmp_path: Path) -> None:
    victim = Manifest.load(deploy_copy).node_shards[0]
    (deploy_copy / victim.path).unlink()
    with pytest.raises(StoreError) as info:
        ShardStore(tmp_path / "D").add_deployment(deploy_copy)
    assert str(deploy_copy / victim.path) in str(info.value)


def test_malformed_manifest_is_a_store_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(StoreError, match="format"):
        ShardStore(tmp_path / "D").add_deployment(bad)


def test_received_blobs_are_checked_against_their_cid(deployment_dir: Path,
                                                      tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "D")
    spec = Manifest.load(deployment_dir).node_shards[0]
    data = (deployment_dir / spec.path).read_bytes()
    with pytest.raises(StoreError, match="does not match"):
        store.add_shard_bytes(spec.cid, [data[:1000], b"\x00" + data[1001:]])
    assert not store.shard_path(spec.cid).exists()
    store.add_shard_bytes(spec.cid, [data[offset:offset + (1 << 20)]
                                     for offset in range(0, len(data), 1 << 20)])
    assert store.shard_path(spec.cid).read_bytes() == data
    manifest = (deployment_dir / "manifest.json").read_bytes()
    with pytest.raises(StoreError, match="does not match"):
        store.add_manifest_bytes(manifest, expected_cid=spec.cid)
    assert not list(store.manifest_dir.iterdir())


def test_incoming_blobs_are_capped_hashed_and_cleaned_up(deployment_dir: Path,
                                                        tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "D")
    spec = Manifest.load(deployment_dir).node_shards[0]
    data = (deployment_dir / spec.path).read_bytes()
    assert store.download_limit(size=spec.size) == (len(data), "the size its manifest declares")
    assert store.download_limit()[0] == DEFAULT_SHARD_SIZE_LIMIT
    assert store.download_limit(manifest=True)[0] == MANIFEST_LIMIT

    with store.receive(spec.cid, 1000) as incoming, pytest.raises(StoreError, match="1000"):
        incoming.write(data[:600])
        incoming.write(data[600:1200])  # over the cap: refused before it is written
    assert list(store.shard_dir.iterdir()) == []  # the temporary file is gone

    with store.receive(spec.cid, len(data)) as incoming:
        for offset in range(0, len(data), 1 << 20):
            incoming.write(data[offset:offset + (1 << 20)])
        incoming.commit()
    assert store.shard_path(spec.cid).read_bytes() == data
    assert [p.name for p in store.shard_dir.iterdir()] == [f"{spec.cid}.onnx"]

    not_a_manifest = b'{"format": "veilnet-manifest/1"}'
    with store.receive(cid_of_bytes(not_a_manifest), MANIFEST_LIMIT, manifest=True) as incoming:
        incoming.write(not_a_manifest)
        with pytest.raises(ValueError, match="name"):
            incoming.commit()
    assert list(store.manifest_dir.iterdir()) == []


def test_a_corrupt_mark_lasts_until_the_file_is_replaced(deploy_copy: Path,
                                                         tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "D")
    _, installed = store.add_deployment(deploy_copy)
    victim = installed[0]
    path = store.shard_path(victim)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    store.mark_corrupt(victim)
    assert store.is_corrupt(victim)
    assert victim not in store.shards() and store.blob_path(victim) is None
    assert sorted(store.shards()) == sorted(installed[1:])
    store.add_deployment(deploy_copy)  # notices the damaged copy and replaces it
    assert cid_of_file(path) == victim
    assert not store.is_corrupt(victim)
    assert sorted(store.shards()) == sorted(installed)


def test_check_data_dir_names_each_kind_of_problem(deployment_dir: Path,
                                                   tmp_path: Path) -> None:
    root = tmp_path / "D"
    store = ShardStore(root)
    mcid, installed = store.add_deployment(deployment_dir)
    assert check_data_dir(root).ok
    (store.shard_dir / "notes.txt").write_text("hi")
    (store.shard_dir / ".incoming-abc").write_bytes(b"partial")
    orphan = b"an onnx file no manifest names"
    (store.shard_dir / f"{cid_of_bytes(orphan)}.onnx").write_bytes(orphan)
    bad_json = b"{not json"
    (store.manifest_dir / f"{cid_of_bytes(bad_json)}.json").write_bytes(bad_json)
    wrong = store.manifest_path(mcid)
    wrong.write_bytes(wrong.read_bytes() + b" ")
    report = check_data_dir(root)
    kinds = sorted((p.kind, Path(p.path).name) for p in report.problems)
    assert kinds == sorted([("bad_name", "notes.txt"),
                            ("bad_manifest", f"{cid_of_bytes(bad_json)}.json"),
                            ("corrupt", f"{mcid}.json")])
    corrupt = next(p for p in report.problems if p.kind == "corrupt")
    assert (corrupt.expected, corrupt.actual) == (mcid, cid_of_file(wrong))
    assert corrupt.expected in corrupt.message and corrupt.actual in corrupt.message
    assert report.manifests == 2 and report.shards == 4
    notes = "\n".join(report.notes)
    assert ".incoming-abc" in notes and cid_of_bytes(orphan) in notes
    # the installed shards are orphans now too: their only manifest is damaged
    assert all(c in notes for c in installed)
    with pytest.raises(StoreError, match="no such data directory"):
        check_data_dir(tmp_path / "nowhere")


def test_api_token_is_created_private_and_reused(tmp_path: Path) -> None:
    token, created = load_or_create_api_token(tmp_path)
    path = tmp_path / "api-token"
    assert created and len(token) >= 32 and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_api_token(tmp_path) == (token, False)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_api_token(tmp_path)
    os.chmod(path, 0o600)
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        load_or_create_api_token(tmp_path)
    path.write_text("an operator's own token, long enough\n")
    assert load_or_create_api_token(tmp_path) == ("an operator's own token, long enough", False)


@pytest.mark.parametrize("text", ["", "hello", "../../etc/passwd", "bafkrei",
                                  "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"])
def test_paths_need_a_cid(tmp_path: Path, text: str) -> None:
    store = ShardStore(tmp_path / "D")
    with pytest.raises(StoreError):
        store.shard_path(text)
    with pytest.raises(StoreError):
        store.manifest_path(text)


# -- load_config ----------------------------------------------------------------------------------

FULL_TOML = """
data_dir = "node1"
listen = ["/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4002"]
http = "127.0.0.1:8401"
bootstrap = ["/ip4/127.0.0.1/tcp/4003/p2p/12D3KooWKEUoGUoGJ7CRt9gxytTcChDc5LFVvPGVPYcSf5jh528x"]
capacity = 3
threads = 2
frame_limit = 1048576
request_timeout = 12.5
announce_interval = 7
log_level = "debug"
"""


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_with_only_a_data_dir(tmp_path: Path) -> None:
    config = load_config(None, {"data_dir": tmp_path / "D"})
    assert config == NodeConfig(data_dir=tmp_path / "D")
    assert config.listen == ["/ip4/127.0.0.1/tcp/0"]
    assert config.http_host_port() == ("127.0.0.1", 0)
    assert config.frame_limit == DEFAULT_FRAME_LIMIT
    assert (config.capacity, config.threads, config.request_timeout) == (1, 0, 60.0)
    assert config.shard_size_limit == DEFAULT_SHARD_SIZE_LIMIT == 1 << 30


def test_shard_size_limit(tmp_path: Path) -> None:
    path = write(tmp_path, 'data_dir = "D"\nshard_size_limit = 1048576\n')
    assert load_config(path, {}).shard_size_limit == 1 << 20
    assert load_config(path, {"shard_size_limit": 5}).shard_size_limit == 5
    for bad in ('"1GiB"', "1.5", "true"):
        with pytest.raises(ConfigError, match="shard_size_limit"):
            load_config(write(tmp_path, f'data_dir = "D"\nshard_size_limit = {bad}\n'), {})
    with pytest.raises(ConfigError, match="shard_size_limit"):
        load_config(None, {"data_dir": tmp_path, "shard_size_limit": 0})


def test_toml_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_TOML), {})
    assert config.data_dir == (tmp_path / "node1").resolve()  # relative to the config file
    assert config.listen == ["/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4002"]
    assert config.http_host_port() == ("127.0.0.1", 8401)
    assert config.bootstrap[0].endswith("/p2p/12D3KooWKEUoGUoGJ7CRt9gxytTcChDc5LFVvPGVPYcSf5jh528x")
    assert (config.capacity, config.threads, config.frame_limit) == (3, 2, 1048576)
    assert (config.request_timeout, config.announce_interval) == (12.5, 7)
    assert config.log_level == "debug"


def test_a_single_listen_string_becomes_a_list(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'data_dir = "d"\nlisten = "/ip4/0.0.0.0/tcp/1"\n'), {})
    assert config.listen == ["/ip4/0.0.0.0/tcp/1"]


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML)
    config = load_config(path, {
        "data_dir": tmp_path / "other", "listen": ["/ip4/127.0.0.1/tcp/5000"],
        "http": "127.0.0.1:9000", "capacity": 5, "frame_limit": 4096,
        "request_timeout": None, "bootstrap": [], "log_level": None,  # unset flags: no effect
    })
    assert config.data_dir == tmp_path / "other"
    assert config.listen == ["/ip4/127.0.0.1/tcp/5000"]
    assert config.http_host_port() == ("127.0.0.1", 9000)
    assert (config.capacity, config.frame_limit) == (5, 4096)
    assert config.request_timeout == 12.5          # from the file
    assert len(config.bootstrap) == 1              # from the file
    assert config.log_level == "debug"


@pytest.mark.parametrize("key", ["colour", "frame-limit", "datadir"])
def test_unknown_key_is_named(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, f'data_dir = "d"\n{key} = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert key in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("key", "value"), [
    ("capacity", '"2"'),
    ("capacity", "true"),
    ("capacity", "1.5"),
    ("threads", "[1]"),
    ("frame_limit", '"64MiB"'),
    ("request_timeout", '"60"'),
    ("request_timeout", "false"),
    ("announce_interval", "[]"),
    ("http", "8401"),
    ("data_dir", "1"),
    ("log_level", "3"),
    ("listen", "4001"),
    ("listen", "[4001]"),
    ("bootstrap", '[["a"]]'),
    ("bootstrap", "{ a = 1 }"),
])
def test_wrong_types_are_named(tmp_path: Path, key: str, value: str) -> None:
    text = f"{key} = {value}\n" if key == "data_dir" else f'data_dir = "d"\n{key} = {value}\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), {})
    assert key in str(info.value)


@pytest.mark.parametrize("http", ["localhost", "127.0.0.1", ":8080", "127.0.0.1:",
                                  "127.0.0.1:http", "127.0.0.1:65536", "127.0.0.1:-1",
                                  "127.0.0.1:80:", "a:\u00b2", "a:\u0663"])
def test_bad_http_address(tmp_path: Path, http: str) -> None:
    with pytest.raises(ConfigError, match="http") as info:
        load_config(None, {"data_dir": tmp_path, "http": http})
    assert repr(http) in str(info.value)
    with pytest.raises(ConfigError, match="http"):
        load_config(write(tmp_path, f'data_dir = "d"\nhttp = "{http}"\n'), {})


@pytest.mark.parametrize(("http", "expected"), [("0.0.0.0:8401", ("0.0.0.0", 8401)),
                                                ("[::1]:9", ("::1", 9)),
                                                ("localhost:65535", ("localhost", 65535))])
def test_good_http_address(tmp_path: Path, http: str, expected: tuple[str, int]) -> None:
    assert load_config(None, {"data_dir": tmp_path, "http": http}).http_host_port() == expected


@pytest.mark.parametrize("value", ["a:\u00b2", "a:\u0663", "[::1]:\u0669\u0669"])
def test_ports_are_ascii_digits_for_the_gateway_too(value: str) -> None:
    from protocols.http_address import split_host_port

    assert split_host_port(value) is None  # "²" made int() fail, "٣" read as 3


@pytest.mark.parametrize(("key", "value"), [("capacity", 0), ("frame_limit", 0),
                                            ("threads", -1), ("request_timeout", 0),
                                            ("announce_interval", -5), ("log_level", "loud")])
def test_out_of_range_values_are_named(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, {"data_dir": tmp_path, key: value})


@pytest.mark.parametrize("domain", ["localhost", "http://veil.example.org/", "10.0.0.1",
                                    "veil.example.org:0", "bad_label.example.org"])
def test_bad_domain_is_refused_at_start(tmp_path: Path, domain: str) -> None:
    with pytest.raises(ConfigError, match="domain"):
        load_config(None, {"data_dir": tmp_path, "domain": domain})


def test_domain_is_normalized(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'data_dir = "D"\ndomain = "Veil.Example.ORG:8443"\n'), {})
    assert config.domain == "veil.example.org:8443"
    assert load_config(None, {"data_dir": tmp_path}).card_ttl == 30.0
    assert load_config(None, {"data_dir": tmp_path, "announce_interval": 20}).card_ttl == 60.0


def test_ledger_flag_is_a_boolean(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, 'data_dir = "D"\nledger = true\n'), {}).ledger is True
    assert load_config(None, {"data_dir": tmp_path}).ledger is False
    with pytest.raises(ConfigError, match="ledger"):
        load_config(write(tmp_path, 'data_dir = "D"\nledger = "yes"\n', "bad.toml"), {})
    with pytest.raises(ConfigError, match="capacity"):  # booleans are not numbers
        load_config(write(tmp_path, 'data_dir = "D"\ncapacity = true\n', "b2.toml"), {})


def test_no_data_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data"):
        load_config(None, {})
    with pytest.raises(ConfigError, match="data"):
        load_config(write(tmp_path, "capacity = 2\n"), {})


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_config(missing, {"data_dir": tmp_path})
    bad = write(tmp_path, "capacity = = 2\n", "bad.toml")
    with pytest.raises(ConfigError, match="TOML"):
        load_config(bad, {"data_dir": tmp_path})


@pytest.mark.parametrize(("text", "match"), [
    (b'data_dir = "D"\ncapacity = 2 # \xe4\n', "not UTF-8"),
    ('data_dir = "D\\u0000"\n', "NUL"),
    ('data_dir = "D"\nrecord_received = "a\\u0000"\n', "record_received"),
    ('data_dir = "D"\nhttp = "127.0.0.1:²"\n', "HOST:PORT"),
    ('data_dir = "D"\nhttp = "127.0.0.1:٣"\n', "HOST:PORT"),
    ('data_dir = "D"\nannounce_interval = nan\n', "finite"),
    ('data_dir = "D"\nrequest_timeout = nan\n', "finite"),
    ('data_dir = "D"\nidle_timeout = inf\n', "finite"),
])
def test_config_errors_found_by_fuzzing(tmp_path: Path, text: str | bytes, match: str) -> None:
    """Found by tests/unit/fuzz/test_fuzz_manifest_config.py: each raised UnicodeDecodeError or
    ValueError instead of ConfigError, or (nan) was accepted."""
    path = tmp_path / "node.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=match):
        load_config(path, {})
