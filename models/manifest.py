"""The ``veilnet-manifest/1`` format: a model as an ordered list of content-addressed shards.

See docs/manifest.md for the format. A manifest is itself content-addressed: its CID is the CID of
the exact bytes of manifest.json, which ``Manifest.dumps`` produces deterministically.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from errors import InputError
from models.cid import cid_of_bytes, cid_of_file, is_valid_cid

FORMAT = "veilnet-manifest/1"
# "client": a shard the client runs between two node shards (ee-decoder/1 re-bases the residual
# stream there); only "node" shards are sent to nodes.
ROLES = ("client-head", "node", "client", "client-tail")
# A deployment's encryption scheme (docs/manifest.md): the one list of scheme names.
EE_ENCODER = "ee-encoder/1"  # equivariant encryption of encoder shards (models/encrypt.py)
EE_DECODER = "ee-decoder/1"  # equivariant encryption of llama decoders (models/ee_decoder.py)
MASKED = "masked/1"  # masked offload of linear layers to nodes (models/masked.py)
ENCRYPTIONS = ("none", EE_ENCODER, EE_DECODER, MASKED)
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")

Dim = int | str | None


class ManifestError(InputError):
    """A manifest (or a shard file it names) that is malformed or inconsistent."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> TensorSpec:
        if not isinstance(doc, dict):
            raise ManifestError(f"{where}: tensor spec must be an object")
        name, dtype, shape = doc.get("name"), doc.get("dtype"), doc.get("shape")
        if not isinstance(name, str) or not name:
            raise ManifestError(f"{where}: tensor 'name' must be a non-empty string")
        if dtype not in DTYPES:
            raise ManifestError(f"{where}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            d is None or isinstance(d, str)
            or (isinstance(d, int) and not isinstance(d, bool) and d >= 0) for d in shape
        ):
            raise ManifestError(
                f"{where}: tensor {name!r} shape must be a list of ints, names or null"
            )
        return cls(name, dtype, tuple(shape))


@dataclass(frozen=True)
class ShardSpec:
    index: int
    cid: str
    role: str
    path: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    size: int | None = None  # bytes of the shard file; None in manifests written before it

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"index": self.index, "cid": self.cid, "role": self.role,
                               "path": self.path}
        if self.size is not None:  # absent, not null, so old manifests re-serialize unchanged
            doc["size"] = self.size
        doc["inputs"] = [t.to_json() for t in self.inputs]
        doc["outputs"] = [t.to_json() for t in self.outputs]
        return doc


@dataclass
class Manifest:
    name: str
    encryption: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    shards: list[ShardSpec]
    extra: dict[str, Any] = field(default_factory=dict)  # tokenizer, source, parent, ...
    path: Path | None = None  # where it was loaded from, if it was

    # --- access ---------------------------------------------------------------------------------

    @property
    def node_shards(self) -> list[ShardSpec]:
        return [s for s in self.shards if s.role == "node"]

    @property
    def head(self) -> ShardSpec:
        return self.shards[0]

    @property
    def tail(self) -> ShardSpec:
        return self.shards[-1]

    def shard_path(self, shard: ShardSpec) -> Path:
        if self.path is None:
            raise ManifestError("manifest has no location; load it from a file first")
        return self.path.parent / shard.path

    # --- (de)serialization ----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "name": self.name,
            "encryption": self.encryption,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "shards": [s.to_json() for s in self.shards],
        }
        doc.update(self.extra)
        return doc

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n").encode()

    @property
    def cid(self) -> str:
        return cid_of_bytes(self.dumps())

    def write(self, directory: Path) -> Path:
        path = Path(directory) / "manifest.json"
        path.write_bytes(self.dumps())
        self.path = path
        return path

    @classmethod
    def from_json(cls, doc: Any, where: str = "manifest") -> Manifest:
        if not isinstance(doc, dict):
            raise ManifestError(f"{where}: a manifest must be a JSON object")
        if doc.get("format") != FORMAT:
            raise ManifestError(f"{where}: 'format' is {doc.get('format')!r}, expected {FORMAT!r}")
        name = doc.get("name")
        if not isinstance(name, str) or not name:
            raise ManifestError(f"{where}: 'name' must be a non-empty string")
        encryption = doc.get("encryption")
        if encryption not in ENCRYPTIONS:
            raise ManifestError(f"{where}: unknown 'encryption' {encryption!r}")
        inputs = _specs(doc.get("inputs"), f"{where}: inputs")
        outputs = _specs(doc.get("outputs"), f"{where}: outputs")
        raw_shards = doc.get("shards")
        if not isinstance(raw_shards, list) or not raw_shards:
            raise ManifestError(f"{where}: 'shards' must be a non-empty list")
        shards = [_shard(raw, i, where) for i, raw in enumerate(raw_shards)]
        known = {"format", "name", "encryption", "inputs", "outputs", "shards"}
        manifest = cls(
            name=name,
            encryption=encryption,
            inputs=inputs,
            outputs=outputs,
            shards=shards,
            extra={k: v for k, v in doc.items() if k not in known},
        )
        manifest.validate(where)
        return manifest

    @classmethod
    def from_json_bytes(cls, data: bytes, where: str = "manifest") -> Manifest:
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{where}: not a JSON manifest: {exc}") from exc
        return cls.from_json(doc, where)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(f"{path}: no such manifest") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: not a readable JSON manifest: {exc}") from exc
        manifest = cls.from_json(doc, str(path))
        manifest.path = path
        return manifest

    # --- consistency ----------------------------------------------------------------------------

    def validate(self, where: str = "manifest") -> None:
        """Check the U-shape and that every shard input is available when the shard runs."""
        roles = [s.role for s in self.shards]
        if roles and "client" in (roles[0], roles[-1]):
            raise ManifestError(f"{where}: a 'client' shard runs between node shards; it cannot "
                                f"be the first or last shard (got {roles})")
        if len(roles) < 3 or roles[0] != "client-head" or roles[-1] != "client-tail" \
                or "node" not in roles:
            raise ManifestError(
                f"{where}: shards must be client-head, one or more node shards (with 'client' "
                f"shards between them), client-tail; got {roles}"
            )
        if any(r not in ("node", "client") for r in roles[1:-1]):
            raise ManifestError(f"{where}: only 'node' and 'client' shards may stand between "
                                "head and tail")
        available = {t.name for t in self.inputs}
        for i, shard in enumerate(self.shards):
            if shard.index != i:
                raise ManifestError(f"{where}: shard at position {i} has index {shard.index}")
            for t in shard.inputs:
                if t.name not in available:
                    raise ManifestError(
                        f"{where}: shard {i} input {t.name!r} is neither a model input nor an "
                        "output of an earlier shard"
                    )
            available.update(t.name for t in shard.outputs)
        for t in self.outputs:
            if t.name not in available:
                raise ManifestError(f"{where}: model output {t.name!r} is produced by no shard")

    def verify_files(self, roles: Iterable[str] = ROLES) -> list[str]:
        """Hash every shard file of the given roles; return problems (empty when all match)."""
        wanted = set(roles)
        problems = []
        for shard in self.shards:
            if shard.role not in wanted:
                continue
            path = self.shard_path(shard)
            if not path.is_file():
                problems.append(f"shard {shard.index}: missing file {path}")
                continue
            actual = cid_of_file(path)
            if actual != shard.cid:
                problems.append(f"shard {shard.index}: {path} hashes to {actual}, not {shard.cid}")
        return problems


def _specs(raw: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ManifestError(f"{where} must be a non-empty list")
    return tuple(TensorSpec.from_json(t, where) for t in raw)


def _shard(raw: Any, position: int, where: str) -> ShardSpec:
    here = f"{where}: shards[{position}]"
    if not isinstance(raw, dict):
        raise ManifestError(f"{here} must be an object")
    index, cid, role, path = raw.get("index"), raw.get("cid"), raw.get("role"), raw.get("path")
    if not isinstance(index, int) or isinstance(index, bool):
        raise ManifestError(f"{here}: 'index' must be an integer")
    if not isinstance(cid, str) or not is_valid_cid(cid):
        raise ManifestError(f"{here}: 'cid' {cid!r} is not a CIDv1 (raw, sha2-256)")
    if role not in ROLES:
        raise ManifestError(f"{here}: unknown role {role!r} (expected one of {ROLES})")
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{here}: 'path' must be a non-empty string")
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise ManifestError(f"{here}: 'path' {path!r} must stay inside the manifest's directory")
    size = raw.get("size")  # optional: manifests written before it have none
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ManifestError(f"{here}: 'size' {size!r} must be a non-negative integer (bytes)")
    return ShardSpec(
        index=index,
        cid=cid,
        role=role,
        path=path,
        inputs=_specs(raw.get("inputs"), f"{here}: inputs"),
        outputs=_specs(raw.get("outputs"), f"{here}: outputs"),
        size=size,
    )
