"""Write an encrypted deployment from a plaintext model directory: ``ee-encoder/1`` for encoder
shards (models/ee_plan.py, models/ee_apply.py), ``ee-decoder/1`` for llama-style decoders
(manifest ``config.family == "llama-decoder"``, models/ee_decoder.py), and with
``scheme="masked"`` the ``masked/1`` masked offload of a BERT encoder (models/masked.py).

Layout of DEPLOY::

    manifest.json          what a node may receive (no key material)
    shards/<cid>.onnx      node shards, what nodes run (EE-transformed; masked/1: bare MatMuls)
    client/                mode 0700, every file in it 0600: the client shards ARE the secret
    client/<cid>.onnx      client head and tail (and the ``client`` shards between node shards:
                           ee-decoder/1 re-bases the stream there, masked/1 runs every
                           non-linear step there) with the key, if any, folded in
    client/key.json        the EE key (veilnet-ee-key/1 or veilnet-ee-decoder-key/1); masked/1
                           has no key and no key.json
    client/tokenizer.json  tokenizer, when the model has one (and chat_template.jinja)

Queries read the client shards, not key.json (kept for ``veilnet model verify`` and audits); the
client SDK refuses client shards that others can read (client/deployment.py).

Everything is transformed in memory first and the directory is moved into place only when all of
it is written, so a graph the scheme does not cover leaves nothing behind.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

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
# encrypt_model_dir's schemes: "ee" (ee-encoder/1 or ee-decoder/1 by family), "masked" (masked/1)
SCHEMES = {"ee": "equivariant encryption, ee-encoder/1 or ee-decoder/1 by the model's family",
           "masked": "masked/1 offload of a bert-encoder's linear layers on noise-masked rows"}


CONSENSUS_TOLERANCE = {"atol": 1e-3, "rtol": 1e-3}


class _Key(Protocol):
    deployment: str | None

    def save(self, path: Path) -> None: ...


def encrypt_model_dir(model_dir: Path, out_dir: Path, seed: int | None = None,
                      progress: Progress = no_progress, scheme: str = "ee") -> Manifest:
    """Encrypt the model in ``model_dir`` into a new deployment ``out_dir`` with ``scheme``
    (``SCHEMES``: "ee" or "masked"); ``seed`` only for tests (anyone who knows it knows the
    key), and only for "ee" (masked/1 has no key: its masks are drawn per query)."""
    if scheme not in SCHEMES:
        choices = "; ".join(f"{name!r} ({what})" for name, what in SCHEMES.items())
        raise EncryptionError(f"unknown encryption scheme {scheme!r}; choose one of: {choices}")
    if scheme == "masked":
        if seed is not None:
            raise EncryptionError("--seed applies to the 'ee' scheme only: masked/1 has no key "
                                  "(the client draws fresh masks for every query)")
        from models.masked import encrypt_masked  # models.masked imports this module

        return encrypt_masked(Path(model_dir), Path(out_dir), progress)
    check_output_dir(out_dir)
    manifest = load_plaintext(Path(model_dir))
    family = (manifest.extra.get("config") or {}).get("family")
    if family == DECODER_FAMILY:
        progress(f"encrypting {len(manifest.node_shards)} decoder node shards ({EE_DECODER})")
        shards, key = encrypt_decoder(manifest, seed, progress)
        return write_deployment(manifest, EE_DECODER, shards, key, Path(out_dir), progress)
    shards, ee_key = _encrypt_encoder(manifest, seed, progress)
    return write_deployment(manifest, SCHEME, shards, ee_key, Path(out_dir), progress)


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


def write_deployment(manifest: Manifest, scheme: str, shards: Sequence[PlannedShard],
                     key: _Key | None, out_dir: Path, progress: Progress,
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
