"""The shards and deployment manifests a node holds, under its data directory.

    D/shards/<cid>.onnx          node shards, each verified against its CID before it is stored
    D/deployments/<cid>.json     the manifests they came from (CID of the manifest bytes)

A node only ever stores shards whose role is ``node``: a deployment's client/ material (head and
tail shards, key, tokenizer) is never copied, fetched or served. Files are written under a
temporary name, fsynced and renamed, so a crash never leaves a half-written shard behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from models import Manifest, ManifestError, ShardSpec, cid_of_bytes, cid_of_digest, is_valid_cid


class StoreError(ValueError):
    """A deployment or shard that cannot be installed."""


@dataclass(frozen=True)
class StoredShard:
    spec: ShardSpec
    deployment: str  # manifest CID
    model: str
    path: Path


class ShardStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.shard_dir = self.root / "shards"
        self.manifest_dir = self.root / "deployments"
        for d in (self.shard_dir, self.manifest_dir):
            d.mkdir(parents=True, exist_ok=True)

    # -- reading --------------------------------------------------------------------------------

    def manifests(self) -> Iterator[tuple[str, Manifest]]:
        for path in sorted(self.manifest_dir.glob("*.json")):
            try:
                yield path.stem, Manifest.from_json_bytes(path.read_bytes(), str(path))
            except (OSError, ManifestError):
                continue  # a damaged file is reported by `check`, never served

    def shards(self) -> dict[str, StoredShard]:
        """Every node shard whose file is present, by CID."""
        found: dict[str, StoredShard] = {}
        for mcid, manifest in self.manifests():
            for spec in manifest.node_shards:
                path = self.shard_path(spec.cid)
                if spec.cid not in found and path.is_file():
                    found[spec.cid] = StoredShard(spec, mcid, manifest.name, path)
        return found

    def shard_path(self, cid: str) -> Path:
        if not is_valid_cid(cid):
            raise StoreError(f"{cid!r} is not a CID")
        return self.shard_dir / f"{cid}.onnx"

    def manifest_path(self, cid: str) -> Path:
        if not is_valid_cid(cid):
            raise StoreError(f"{cid!r} is not a CID")
        return self.manifest_dir / f"{cid}.json"

    def blob_path(self, cid: str) -> Path | None:
        """The file to serve for ``cid`` over /veilnet/shard/1: a node shard or a manifest."""
        for path in (self.shard_path(cid), self.manifest_path(cid)):
            if path.is_file():
                return path
        return None

    # -- writing --------------------------------------------------------------------------------

    def add_manifest_bytes(self, data: bytes, expected_cid: str | None = None,
                           ) -> tuple[str, Manifest]:
        """Validate and store a manifest; with ``expected_cid``, only if the bytes match it."""
        manifest = Manifest.from_json_bytes(data, "deployment manifest")
        mcid = cid_of_bytes(data)
        if expected_cid is not None and mcid != expected_cid:
            raise StoreError(f"content does not match CID {expected_cid}; not stored")
        target = self.manifest_path(mcid)
        if not target.exists():
            self._write_atomic(target, [data], mcid)
        return mcid, manifest

    def add_shard_bytes(self, cid: str, chunks: Iterable[bytes]) -> None:
        """Store a node shard received in ``chunks`` if their SHA-256 matches ``cid``."""
        self._write_atomic(self.shard_path(cid), chunks, cid)

    def add_deployment(self, deploy_dir: Path, only: Iterable[str] | None = None,
                       ) -> tuple[str, list[str]]:
        """Install the manifest and node shards of a deployment directory.

        ``only`` limits the shards to those CIDs. Returns (manifest CID, installed shard CIDs).
        """
        deploy_dir = Path(deploy_dir)
        mpath = deploy_dir / "manifest.json"
        try:
            data = mpath.read_bytes()
        except OSError as exc:
            raise StoreError(f"{mpath}: cannot read the deployment manifest: "
                             f"{exc.strerror}") from exc
        try:
            mcid, manifest = self.add_manifest_bytes(data)
        except ManifestError as exc:
            raise StoreError(str(exc)) from exc
        wanted = set(only) if only is not None else None
        node_cids = {s.cid for s in manifest.node_shards}
        if wanted is not None:
            client = {s.cid for s in manifest.shards if s.role != "node"} & wanted
            if client:
                raise StoreError(f"{sorted(client)} are client shards; a node never takes a "
                                 "deployment's client material")
            unknown = wanted - node_cids
            if unknown:
                raise StoreError(f"{mpath}: no node shard {sorted(unknown)} in this deployment")
        installed = []
        for spec in manifest.node_shards:
            if wanted is not None and spec.cid not in wanted:
                continue
            source = deploy_dir / spec.path
            if not source.is_file():
                raise StoreError(f"{source}: node shard {spec.cid} is missing")
            if not self.shard_path(spec.cid).is_file():
                with open(source, "rb") as f:
                    self.add_shard_bytes(spec.cid, iter(lambda: f.read(1 << 20), b""))
            installed.append(spec.cid)
        return mcid, installed

    def _write_atomic(self, target: Path, chunks: Iterable[bytes], cid: str) -> None:
        """Write chunks to ``target`` only if their SHA-256 matches ``cid``."""
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if cid_of_digest(digest.digest()) != cid:
                raise StoreError(f"content does not match CID {cid}; not stored")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
