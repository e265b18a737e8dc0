"""The shards and deployment manifests a node holds, under its data directory.

    D/shards/<cid>.onnx          node shards, each verified against its CID before it is stored
    D/deployments/<cid>.json     the manifests they came from (CID of the manifest bytes)

A node only ever stores shards whose role is ``node``: a deployment's client/ material (head and
tail shards, key, tokenizer) is never copied, fetched or served. Files are written under a
temporary name while they are hashed, fsynced and renamed only if they match their CID, so a
crash never leaves a half-written shard behind and a download never sits in memory
(``IncomingBlob``). A download is capped: a manifest at ``MANIFEST_LIMIT``, a shard at the size
its manifest declares, or at ``shard_size_limit`` when the manifest declares none.

A file can still rot on disk after it was stored. The executor hashes a shard file before it
loads it; one that no longer matches its CID is marked corrupt (``mark_corrupt``) and is then no
longer listed or served, until a good copy replaces the file. ``check_data_dir`` (``veilnet node
check``) verifies a whole data directory offline.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from errors import InputError
from models import (
    Manifest,
    ManifestError,
    ShardSpec,
    cid_of_bytes,
    cid_of_digest,
    cid_of_file,
    is_valid_cid,
)
from node.config import DEFAULT_SHARD_SIZE_LIMIT

MANIFEST_LIMIT = 1 << 20  # a manifest of a 100-shard model is under 100 KiB
READ_BLOCK = 1 << 20
SHARD_DIR = "shards"
MANIFEST_DIR = "deployments"
INCOMING_PREFIX = ".incoming-"


class StoreError(InputError):
    """A deployment or shard that cannot be installed in a node's shard store (``ShardStore``,
    node/store.py): too large, not matching its CID, not a node shard, unreadable. Not
    ``ledger.store.StoreError`` (the ledger's log store)."""


@dataclass(frozen=True)
class StoredShard:
    spec: ShardSpec
    deployment: str  # manifest CID
    model: str
    path: Path


def _file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class IncomingBlob:
    """A blob arriving in chunks: written to a temporary file beside ``target`` and hashed as it
    is written, never more than ``limit`` bytes. ``commit()`` stores it under ``target`` only if
    it hashes to ``cid`` (and, for a manifest, parses); leaving the ``with`` block without a
    commit deletes the temporary file."""

    def __init__(self, target: Path, cid: str, limit: int, manifest: bool = False) -> None:
        self.target, self.cid, self.limit, self.manifest = target, cid, limit, manifest
        self.received = 0
        self._digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=INCOMING_PREFIX)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._done = False

    def write(self, data: bytes) -> None:
        if self.received + len(data) > self.limit:
            raise StoreError(f"{self.cid}: more than {self.limit} bytes; not stored")
        self._digest.update(data)
        self._file.write(data)
        self.received += len(data)

    def commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if cid_of_digest(self._digest.digest()) != self.cid:
            raise StoreError(f"content does not match CID {self.cid}; not stored")
        if self.manifest:  # at most MANIFEST_LIMIT bytes: parsed in memory
            Manifest.from_json_bytes(self._tmp.read_bytes(), f"deployment manifest {self.cid}")
        os.replace(self._tmp, self.target)
        self._done = True

    def discard(self) -> None:
        if not self._done:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._done = True

    def __enter__(self) -> IncomingBlob:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.discard()


class ShardStore:
    def __init__(self, data_dir: Path, shard_size_limit: int = DEFAULT_SHARD_SIZE_LIMIT) -> None:
        self.root = Path(data_dir)
        self.shard_dir = self.root / SHARD_DIR
        self.manifest_dir = self.root / MANIFEST_DIR
        self.shard_size_limit = shard_size_limit  # for shards whose manifest declares no size
        # shard CID -> identity of the file found not to match it; a replaced file (new inode,
        # size or mtime) is judged afresh
        self._corrupt: dict[str, tuple[int, int, int, int]] = {}
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
        """Every node shard whose file is present and not known to be corrupt, by CID."""
        found: dict[str, StoredShard] = {}
        for mcid, manifest in self.manifests():
            for spec in manifest.node_shards:
                path = self.shard_path(spec.cid)
                if spec.cid not in found and path.is_file() and not self.is_corrupt(spec.cid):
                    found[spec.cid] = StoredShard(spec, mcid, manifest.name, path)
        return found

    def load_manifest(self, cid: str) -> Manifest:
        """A stored manifest (StoreError if it is absent or unreadable)."""
        path = self.manifest_path(cid)
        try:
            return Manifest.from_json_bytes(path.read_bytes(), str(path))
        except OSError as exc:
            raise StoreError(f"{path}: cannot read the manifest: {exc.strerror}") from exc
        except ManifestError as exc:
            raise StoreError(str(exc)) from exc

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
        if self.is_corrupt(cid):
            return None
        for path in (self.shard_path(cid), self.manifest_path(cid)):
            if path.is_file():
                return path
        return None

    # -- integrity ------------------------------------------------------------------------------

    def mark_corrupt(self, cid: str) -> None:
        """Stop listing and serving shard ``cid``: its file does not hash to its CID."""
        try:
            self._corrupt[cid] = _file_identity(self.shard_path(cid).stat())
        except OSError:
            self._corrupt.pop(cid, None)  # gone already: nothing left to serve

    def is_corrupt(self, cid: str) -> bool:
        """True while the file that was found corrupt is still the one in place."""
        mark = self._corrupt.get(cid)
        if mark is None:
            return False
        try:
            if _file_identity(self.shard_path(cid).stat()) == mark:
                return True
        except OSError:
            pass
        del self._corrupt[cid]
        return False

    # -- writing --------------------------------------------------------------------------------

    def download_limit(self, manifest: bool = False, size: int | None = None) -> tuple[int, str]:
        """The most bytes a download of a manifest, or of a shard whose manifest declares
        ``size``, may have; and where that limit comes from (for error messages)."""
        if manifest:
            return MANIFEST_LIMIT, "the limit for a manifest"
        if size is not None:
            return size, "the size its manifest declares"
        return self.shard_size_limit, "this node's shard_size_limit (its manifest declares no size)"

    def receive(self, cid: str, limit: int, manifest: bool = False) -> IncomingBlob:
        """A temporary file for a shard (or a manifest) arriving in chunks; see IncomingBlob."""
        target = self.manifest_path(cid) if manifest else self.shard_path(cid)
        return IncomingBlob(target, cid, limit, manifest)

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
                       on_plan: Callable[[str, list[ShardSpec]], Callable[[ShardSpec], None]]
                       | None = None) -> tuple[str, list[str]]:
        """Install the manifest and node shards of a deployment directory.

        ``only`` limits the shards to those CIDs. A shard already stored is kept if it still
        matches its CID and replaced otherwise. Returns (manifest CID, installed shard CIDs).
        ``on_plan(manifest CID, shards to install)``, called once the request is checked,
        returns a callback called after each shard is installed (progress).
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
        specs = [s for s in manifest.node_shards if wanted is None or s.cid in wanted]
        done = on_plan(mcid, specs) if on_plan is not None else None
        for spec in specs:
            source = deploy_dir / spec.path
            if not source.is_file():
                raise StoreError(f"{source}: node shard {spec.cid} is missing")
            target = self.shard_path(spec.cid)
            if not target.is_file() or cid_of_file(target) != spec.cid:
                with open(source, "rb") as f:
                    self.add_shard_bytes(spec.cid, iter(lambda: f.read(READ_BLOCK), b""))
            installed.append(spec.cid)
            if done is not None:
                done(spec)
        return mcid, installed

    def _write_atomic(self, target: Path, chunks: Iterable[bytes], cid: str) -> None:
        """Write chunks to ``target`` only if their SHA-256 matches ``cid``."""
        with IncomingBlob(target, cid, limit=1 << 62) as incoming:
            for chunk in chunks:
                incoming.write(chunk)
            incoming.commit()


# -- veilnet node check ---------------------------------------------------------------------------

@dataclass
class Problem:
    path: str
    kind: str  # corrupt | bad_name | bad_manifest | unreadable
    message: str
    expected: str | None = None
    actual: str | None = None


@dataclass
class CheckReport:
    data_dir: str
    manifests: int = 0  # files checked
    shards: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not wrong

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"data_dir": self.data_dir, "ok": self.ok, "manifests": self.manifests,
                "shards": self.shards, "problems": [asdict(p) for p in self.problems],
                "notes": self.notes}


def check_data_dir(data_dir: Path) -> CheckReport:
    """Hash every manifest and shard file under ``data_dir`` and compare it with the CID it is
    named after; also check that each manifest parses. Reads only; creates nothing."""
    root = Path(data_dir)
    if not root.is_dir():
        raise StoreError(f"{root}: no such data directory")
    report = CheckReport(str(root))
    listed: set[str] = set()
    for sub, suffix in ((MANIFEST_DIR, ".json"), (SHARD_DIR, ".onnx")):
        folder = root / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(INCOMING_PREFIX):
                report.notes.append(f"{path}: an unfinished download (the node writes these "
                                    "while fetching; one left after a crash is safe to delete)")
                continue
            if not path.is_file():
                continue
            if sub == MANIFEST_DIR:
                report.manifests += 1
            else:
                report.shards += 1
            expected = path.name.removesuffix(suffix)
            if not path.name.endswith(suffix) or not is_valid_cid(expected):
                report.problems.append(Problem(
                    str(path), "bad_name", f"{path}: not named <CID>{suffix}; the node ignores "
                                           "it"))
                continue
            try:
                actual = cid_of_file(path)
            except OSError as exc:
                report.problems.append(Problem(str(path), "unreadable",
                                               f"{path}: cannot read: {exc.strerror}", expected))
                continue
            if actual != expected:
                report.problems.append(Problem(
                    str(path), "corrupt", f"{path}: hashes to {actual}, not {expected}; the node "
                                          "refuses to serve it: reinstall it (veilnet node "
                                          "add-shards, or POST /v1/shards/fetch)",
                    expected, actual))
                continue
            if sub == MANIFEST_DIR:
                try:
                    manifest = Manifest.from_json_bytes(path.read_bytes(), str(path))
                except ManifestError as exc:
                    report.problems.append(Problem(str(path), "bad_manifest", str(exc),
                                                   expected, actual))
                    continue
                listed.update(s.cid for s in manifest.node_shards)
    shard_dir = root / SHARD_DIR
    if shard_dir.is_dir():
        for path in sorted(shard_dir.glob("*.onnx")):
            if path.stem not in listed and is_valid_cid(path.stem):
                report.notes.append(f"{path}: no manifest in {root / MANIFEST_DIR} names this "
                                    "shard, so the node does not serve it")
    return report
