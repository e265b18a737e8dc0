"""Issue 12, items 4 and 7: the checks that need no running node (split from
tests/network/test_hardening_shards.py, which attacks real node processes): ``veilnet node
check`` on a clean and a missing data directory, run in this process, and the manifest's shard
sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from node_helpers import veilnet_in_process as veilnet

from models import Manifest, ManifestError
from node.store import ShardStore


def old_style(manifest_bytes: bytes) -> bytes:
    """The same deployment as a manifest written before shards had a 'size'."""
    doc = json.loads(manifest_bytes)
    for shard in doc["shards"]:
        del shard["size"]
    return Manifest.from_json(doc).dumps()


def test_check_a_clean_and_a_missing_data_dir(tmp_path: Path, deployment_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "D"
    ShardStore(data_dir).add_deployment(deployment_dir)
    result = veilnet(capsys, "node", "check", str(data_dir))
    assert result.returncode == 0, result.stdout
    report = json.loads(veilnet(capsys, "node", "check", "--json", str(data_dir)).stdout)
    assert report == {"data_dir": str(data_dir), "ok": True, "manifests": 1, "shards": 2,
                      "problems": [], "notes": []}
    missing = veilnet(capsys, "node", "check", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such data directory" in missing.stderr


def test_built_manifests_declare_shard_sizes(minilm_dir: Path, deployment_dir: Path) -> None:
    for directory in (minilm_dir, deployment_dir):
        manifest = Manifest.load(directory)
        for shard in manifest.shards:
            assert shard.size == manifest.shard_path(shard).stat().st_size


def test_old_manifests_without_sizes_still_read_and_keep_their_bytes(
        deployment_dir: Path) -> None:
    old = old_style((deployment_dir / "manifest.json").read_bytes())
    assert b'"size"' not in old
    manifest = Manifest.from_json_bytes(old)
    assert all(s.size is None for s in manifest.shards)
    assert manifest.dumps() == old  # so its CID is unchanged


@pytest.mark.parametrize("size", [-1, "12", True, 1.5, [3]])
def test_a_bad_size_is_named(deployment_dir: Path, size: object) -> None:
    doc = json.loads((deployment_dir / "manifest.json").read_bytes())
    doc["shards"][1]["size"] = size
    with pytest.raises(ManifestError, match=r"shards\[1\]: 'size'"):
        Manifest.from_json(doc)
