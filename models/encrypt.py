"""Write an encrypted deployment from a plaintext model directory: ``ee-encoder/1`` for encoder
shards (models/ee_plan.py, models/ee_apply.py), ``ee-decoder/1`` for llama-style decoders
(manifest ``config.family == "llama-decoder"``, models/ee_decoder.py).

Layout of DEPLOY::

    manifest.json          what a node may receive (no key material)
    shards/<cid>.onnx      EE-transformed node shards, what nodes run
    client/                mode 0700, every file in it 0600: the client shards ARE the secret
    client/<cid>.onnx      client head and tail (and, for decoders, the ``client`` shards that
                           re-base the stream between node shards) with the key folded in
    client/key.json        the EE key (veilnet-ee-key/1 or veilnet-ee-decoder-key/1)
    client/tokenizer.json  tokenizer, when the model has one (and chat_template.jinja)

Queries read the client shards, not key.json (kept for ``veilnet model verify`` and audits); the
client SDK refuses client shards that others can read (client/deployment.py).

Everything is transformed in memory first and the directory is moved into place only when all of
it is written, so a graph the scheme does not cover leaves nothing behind.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import onnx

from crypto.ee_key import EEKey
from models.cid import cid_of_bytes
from models.ee_apply import encrypt_node_shard, fold_into_head, fold_into_tail
from models.ee_decoder import PlannedShard, encrypt_decoder
from models.ee_layouts import Layout, Plain
from models.ee_plan import EncryptionError, plan_encryption
from models.importer import Progress, check_output_dir, no_progress, staged_directory
from models.manifest import EE_DECODER, EE_ENCODER, Manifest, ManifestError, ShardSpec

SCHEME = EE_ENCODER  # the encoder scheme (ee-decoder/1 for family llama-decoder)
DECODER_FAMILY = "llama-decoder"
CLIENT_FILES = ("tokenizer", "chat_template")  # extra fields naming files that go to client/


CONSENSUS_TOLERANCE = {"atol": 1e-3, "rtol": 1e-3}


class _Key(Protocol):
    deployment: str | None

    def save(self, path: Path) -> None: ...


def encrypt_model_dir(model_dir: Path, out_dir: Path, seed: int | None = None,
                      progress: Progress = no_progress) -> Manifest:
    """Encrypt the model in ``model_dir`` into a new deployment ``out_dir``; ``seed`` only for
    tests (anyone who knows it knows the key)."""
    check_output_dir(out_dir)
    manifest = Manifest.load(Path(model_dir))
    if manifest.encryption != "none":
        raise ManifestError(f"{manifest.path}: already encrypted ({manifest.encryption})")
    problems = manifest.verify_files()
    if problems:
        raise ManifestError(f"{manifest.path}: " + "; ".join(problems))
    family = (manifest.extra.get("config") or {}).get("family")
    if family == DECODER_FAMILY:
        progress(f"encrypting {len(manifest.node_shards)} decoder node shards ({EE_DECODER})")
        shards, key = encrypt_decoder(manifest, seed, progress)
        return _write(manifest, EE_DECODER, shards, key, Path(out_dir), progress)
    shards, ee_key = _encrypt_encoder(manifest, seed, progress)
    return _write(manifest, SCHEME, shards, ee_key, Path(out_dir), progress)


def _encrypt_encoder(manifest: Manifest, seed: int | None, progress: Progress,
                     ) -> tuple[list[PlannedShard], EEKey]:
    models = {s.index: onnx.load(str(manifest.shard_path(s))) for s in manifest.shards}
    node_indices = [s.index for s in manifest.node_shards]

    progress(f"analysing {len(node_indices)} node shards for {SCHEME}")
    plan = plan_encryption([(i, models[i]) for i in node_indices])
    model_inputs = {t.name for t in manifest.inputs}
    sent: dict[str, Layout] = {}  # tensors the head sends, in the layout node shards expect
    for i in node_indices:
        for spec in manifest.shards[i].inputs:
            lay = plan.layouts[i][spec.name]
            if spec.name in plan.boundary:
                continue  # produced by an earlier node shard
            if spec.name in model_inputs and not isinstance(lay, Plain):
                raise EncryptionError(f"node shard {i} reads model input {spec.name!r} directly; "
                                      "cut so that the client head computes what it needs")
            if sent.setdefault(spec.name, lay) != lay:
                raise EncryptionError(f"tensor {spec.name!r} is read in two different layouts")
    progress(f"generating key: {len(plan.perm_sizes)} permutation spaces, "
             f"{len(plan.attention_dims)} attention blocks")
    key = EEKey.generate(SCHEME, plan.perm_sizes, plan.attention_dims, seed=seed)

    shards = []
    for s in manifest.shards:
        if s.role == "node":
            model = encrypt_node_shard(models[s.index], plan.weight_ops[s.index], key)
        elif s.role == "client-head":
            model = fold_into_head(models[s.index], sent, key)
        else:
            model = fold_into_tail(models[s.index], {**sent, **plan.boundary}, key)
        shards.append(PlannedShard(s.role, model, s.inputs, s.outputs))
        progress(f"shard {s.index} ({s.role}) transformed")
    return shards, key


def _write(manifest: Manifest, scheme: str, shards: Sequence[PlannedShard], key: _Key,
           out_dir: Path, progress: Progress) -> Manifest:
    """Stage DEPLOY (node shards in shards/, every other shard, the key and the client files
    in client/ 0700 with files 0600), then move it into place."""
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
        deployment = Manifest(manifest.name, scheme, manifest.inputs, manifest.outputs, specs,
                              extra)
        deployment.validate()
        deployment.write(tmp)
        key.deployment = deployment.cid
        key.save(tmp / "client" / "key.json")
    deployment.path = Path(out_dir) / "manifest.json"
    progress(f"wrote {deployment.path} (deployment {deployment.cid}); the secret is "
             f"{Path(out_dir) / 'client'}/ (client shards with the key folded in, and key.json; "
             "mode 0600, never share it)")
    return deployment
