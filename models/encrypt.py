"""Write an encrypted deployment (``encryption: ee-encoder/1``) from a plaintext model directory.

Layout of DEPLOY::

    manifest.json          what a node may receive (no key material)
    shards/<cid>.onnx      EE-transformed node shards, what nodes run
    client/                mode 0700, every file in it 0600: the client shards ARE the secret
    client/<cid>.onnx      client head and tail with the key folded in   (never sent)
    client/key.json        the EE key                                     (never sent)
    client/tokenizer.json  tokenizer, when the model has one

Queries read the client shards, not key.json (kept for ``veilnet model verify`` and audits); the
client SDK refuses client shards that others can read (client/deployment.py).

Everything is transformed in memory first and the directory is moved into place only when all of
it is written, so a graph the scheme does not cover leaves nothing behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from crypto.ee_key import EEKey
from models.cid import cid_of_bytes
from models.ee_apply import encrypt_node_shard, fold_into_head, fold_into_tail
from models.ee_layouts import Layout, Plain
from models.ee_plan import EncryptionError, plan_encryption
from models.importer import Progress, check_output_dir, no_progress, staged_directory
from models.manifest import EE_ENCODER, Manifest, ManifestError, ShardSpec

SCHEME = EE_ENCODER  # the scheme this module writes


CONSENSUS_TOLERANCE = {"atol": 1e-3, "rtol": 1e-3}


def encrypt_model_dir(model_dir: Path, out_dir: Path, seed: int | None = None,
                      progress: Progress = no_progress) -> Manifest:
    check_output_dir(out_dir)
    manifest = Manifest.load(Path(model_dir))
    if manifest.encryption != "none":
        raise ManifestError(f"{manifest.path}: already encrypted ({manifest.encryption})")
    family = (manifest.extra.get("config") or {}).get("family")
    if family == "llama-decoder":
        raise EncryptionError(f"{manifest.path}: {manifest.name} is a decoder (llama-decoder); "
                              f"{SCHEME} encrypts encoder shards, and the decoder scheme "
                              "(ee-decoder/1) is not built yet")
    problems = manifest.verify_files()
    if problems:
        raise ManifestError(f"{manifest.path}: " + "; ".join(problems))
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

    encrypted: dict[int, onnx.ModelProto] = {}
    for s in manifest.shards:
        if s.role == "node":
            encrypted[s.index] = encrypt_node_shard(models[s.index], plan.weight_ops[s.index], key)
        elif s.role == "client-head":
            encrypted[s.index] = fold_into_head(models[s.index], sent, key)
        else:
            encrypted[s.index] = fold_into_tail(models[s.index], {**sent, **plan.boundary}, key)
        progress(f"shard {s.index} ({s.role}) transformed")

    with staged_directory(out_dir) as tmp:
        (tmp / "shards").mkdir()
        (tmp / "client").mkdir(mode=0o700)
        (tmp / "client").chmod(0o700)  # whatever the umask
        specs = []
        for s in manifest.shards:
            data = encrypted[s.index].SerializeToString()
            cid = cid_of_bytes(data)
            folder = "shards" if s.role == "node" else "client"
            (tmp / folder / f"{cid}.onnx").write_bytes(data)
            if folder == "client":
                (tmp / folder / f"{cid}.onnx").chmod(0o600)
            specs.append(ShardSpec(s.index, cid, s.role, f"{folder}/{cid}.onnx", s.inputs,
                                   s.outputs, size=len(data)))
        extra = dict(manifest.extra)
        extra["parent"] = manifest.cid
        # how far two honest nodes' outputs may differ (docs/consensus.md: measured 0 on one
        # machine across thread counts and graph optimizations; float32 accumulation across
        # machines stays near 1e-5; a 10%-of-std lie is about 5e-2)
        extra.setdefault("consensus", dict(CONSENSUS_TOLERANCE))
        if "tokenizer" in extra:
            tok = dict(extra["tokenizer"])
            shutil.copyfile(manifest.path.parent / tok["path"], tmp / "client" / "tokenizer.json")
            (tmp / "client" / "tokenizer.json").chmod(0o600)
            tok["path"] = "client/tokenizer.json"
            extra["tokenizer"] = tok
        deployment = Manifest(manifest.name, SCHEME, manifest.inputs, manifest.outputs, specs,
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
