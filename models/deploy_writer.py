"""Writing a deployment directory, for every scheme (models/encrypt.py: ee-encoder/1 and
ee-decoder/1; models/masked.py: masked/1): ``load_plaintext`` reads and checks the model it is
made from; ``write_deployment`` stages DEPLOY (node shards in shards/, everything else in
client/ 0700 with files 0600, the key if the scheme has one) and moves it into place.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from models.cid import cid_of_bytes
from models.ee_decoder import PlannedShard
from models.importer import Progress, staged_directory
from models.manifest import Manifest, ManifestError, ShardSpec

CLIENT_FILES = ("tokenizer", "chat_template")  # extra fields naming files that go to client/

CONSENSUS_TOLERANCE = {"atol": 1e-3, "rtol": 1e-3}


class Key(Protocol):
    """A scheme's secret key: told the deployment's CID, saved as client/key.json."""

    deployment: str | None

    def save(self, path: Path) -> None: ...


def load_plaintext(model: Manifest | Path) -> Manifest:
    """A plaintext model directory's manifest (or the manifest given), with every shard file
    checked against its CID."""
    manifest = model if isinstance(model, Manifest) else Manifest.load(Path(model))
    if manifest.path is None:
        raise ManifestError(f"{manifest.name}: manifest has no location; load it from a file")
    if manifest.encryption != "none":
        raise ManifestError(f"{manifest.path}: already encrypted ({manifest.encryption})")
    problems = manifest.verify_files()
    if problems:
        raise ManifestError(f"{manifest.path}: " + "; ".join(problems))
    return manifest


def write_deployment(manifest: Manifest, scheme: str, shards: Sequence[PlannedShard],
                     key: Key | None, out_dir: Path, progress: Progress,
                     more_extra: Callable[[Sequence[ShardSpec]], Mapping[str, Any]] | None = None,
                     ) -> Manifest:
    """Stage DEPLOY (node shards in shards/, every other shard, the key and the client files
    in client/ 0700 with files 0600), then move it into place. ``key`` None: a scheme without
    a key (masked/1), no key.json. ``more_extra(shard specs)``: fields to add to the manifest
    that depend on the shards' CIDs."""
    assert manifest.path is not None  # loaded from a file
    with staged_directory(out_dir) as tmp:
        (tmp / "shards").mkdir()
        (tmp / "client").mkdir(mode=0o700)
        (tmp / "client").chmod(0o700)  # whatever the umask
        specs = []
        for index, shard in enumerate(shards):
            data = shard.model.SerializeToString()
            cid = cid_of_bytes(data)
            folder = "shards" if shard.role == "node" else "client"
            (tmp / folder / f"{cid}.onnx").write_bytes(data)
            if folder == "client":
                (tmp / folder / f"{cid}.onnx").chmod(0o600)
            specs.append(ShardSpec(index, cid, shard.role, f"{folder}/{cid}.onnx", shard.inputs,
                                   shard.outputs, size=len(data)))
        extra = dict(manifest.extra)
        extra["parent"] = manifest.cid
        # how far two honest nodes' outputs may differ (docs/consensus.md: measured 0 on one
        # machine across thread counts and graph optimizations; float32 accumulation across
        # machines stays near 1e-5; a 10%-of-std lie is about 5e-2)
        extra.setdefault("consensus", dict(CONSENSUS_TOLERANCE))
        for field in CLIENT_FILES:  # tokenizer, chat template: client side only
            if field in extra:
                doc = dict(extra[field])
                target = tmp / "client" / Path(doc["path"]).name
                shutil.copyfile(manifest.path.parent / doc["path"], target)
                target.chmod(0o600)
                doc["path"] = f"client/{target.name}"
                extra[field] = doc
        if more_extra is not None:
            extra.update(more_extra(specs))
        deployment = Manifest(manifest.name, scheme, manifest.inputs, manifest.outputs, specs,
                              extra)
        deployment.validate()
        deployment.write(tmp)
        if key is not None:
            key.deployment = deployment.cid
            key.save(tmp / "client" / "key.json")
    deployment.path = Path(out_dir) / "manifest.json"
    client = Path(out_dir) / "client"
    if key is not None:
        progress(f"wrote {deployment.path} (deployment {deployment.cid}); the secret is "
                 f"{client}/ (client shards with the key folded in, and key.json; mode 0600, "
                 "never share it)")
    else:
        progress(f"wrote {deployment.path} (deployment {deployment.cid}); the client side is "
                 f"{client}/ (client shards, mode 0600; keep it to yourself)")
    return deployment


__all__ = ["CLIENT_FILES", "CONSENSUS_TOLERANCE", "Key", "load_plaintext", "write_deployment"]
