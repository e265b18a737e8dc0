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

from pathlib import Path

import onnx

from crypto.ee_key import EEKey
from models.deploy_writer import load_plaintext, write_deployment
from models.ee_apply import encrypt_node_shard, fold_into_head, fold_into_tail
from models.ee_decoder import PlannedShard, encrypt_decoder
from models.ee_layouts import Layout, Plain
from models.ee_plan import EncryptionError, plan_encryption
from models.importer import check_output_dir
from models.manifest import EE_DECODER, EE_ENCODER, Manifest
from models.masked import encrypt_masked
from models.progress import Progress, counted, no_progress

SCHEME = EE_ENCODER  # the encoder scheme (ee-decoder/1 for family llama-decoder)
DECODER_FAMILY = "llama-decoder"
# encrypt_model_dir's schemes: "ee" (ee-encoder/1 or ee-decoder/1 by family), "masked" (masked/1)
SCHEMES = {"ee": "equivariant encryption, ee-encoder/1 or ee-decoder/1 by the model's family",
           "masked": "masked/1 offload of a bert-encoder's linear layers on noise-masked rows"}


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
    with counted(progress, "transforming shards", len(manifest.shards), "shards") as done:
        for s in manifest.shards:
            if s.role == "node":
                model = encrypt_node_shard(models[s.index], plan.weight_ops[s.index], key)
            elif s.role == "client-head":
                model = fold_into_head(models[s.index], sent, key)
            else:
                model = fold_into_tail(models[s.index], {**sent, **plan.boundary}, key)
            shards.append(PlannedShard(s.role, model, s.inputs, s.outputs))
            progress(f"shard {s.index} ({s.role}) transformed")
            done.advance()
    return shards, key
