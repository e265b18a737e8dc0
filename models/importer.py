"""Import models into a directory of content-addressed shards plus manifest.json."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import helper

from errors import InputError
from models.cid import cid_of_bytes, cid_of_file
from models.manifest import Manifest, ShardSpec, TensorSpec
from models.minilm import MODEL_NAME, PACKAGE, build_minilm, locate
from models.progress import Progress, counted, no_progress
from models.split import split_model


class ImportError_(InputError):  # trailing underscore: not the builtin ImportError
    """A model file that cannot be imported; the message names the file and the problem."""


class OutputDirError(InputError):
    """The output directory cannot be used."""


def check_output_dir(target: Path) -> None:
    """Fail early, before any slow work, if ``target`` cannot receive a new directory."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise OutputDirError(f"{target} already exists and is not empty; choose a new directory")


@contextmanager
def staged_directory(target: Path, mode: int = 0o755) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place only on success, so a
    failed run never leaves a half-written model or deployment behind."""
    target = Path(target)
    check_output_dir(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(mode)
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tensor_spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    tt = vi.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                  for d in tt.shape.dim)
    return TensorSpec(vi.name, dtype, shape)


def write_sharded(model: onnx.ModelProto, cuts: Sequence[str], out_dir: Path, name: str,
                  extra: dict[str, Any] | None = None, progress: Progress = no_progress,
                  files: dict[str, Path] | None = None,
                  blobs: dict[str, bytes] | None = None) -> Manifest:
    """Split ``model`` at ``cuts`` and write ``<cid>.onnx`` shards and manifest.json to
    ``out_dir`` (which must not exist or be empty). ``files`` are copied in beside them and
    ``blobs`` written beside them (name -> bytes)."""
    progress(f"splitting at {len(cuts)} cut tensors: {', '.join(cuts)}")
    shards = split_model(model, cuts)
    initializers = {t.name for t in model.graph.initializer}
    with staged_directory(out_dir) as tmp, \
            counted(progress, "writing shards", len(shards), "shards") as written:
        specs = []
        for k, shard in enumerate(shards):
            role = "client-head" if k == 0 else "client-tail" if k == len(shards) - 1 else "node"
            data = shard.model.SerializeToString()
            cid = cid_of_bytes(data)
            (tmp / f"{cid}.onnx").write_bytes(data)
            progress(f"shard {k} ({role}): {len(shard.model.graph.node)} nodes, "
                     f"{len(data) / 1e6:.1f} MB -> {cid}.onnx")
            written.advance()
            specs.append(ShardSpec(
                index=k, cid=cid, role=role, path=f"{cid}.onnx", size=len(data),
                inputs=tuple(tensor_spec(v) for v in shard.model.graph.input),
                outputs=tuple(tensor_spec(v) for v in shard.model.graph.output)))
        for dest, src in (files or {}).items():
            shutil.copyfile(src, tmp / dest)
        for dest, blob in (blobs or {}).items():
            (tmp / dest).write_bytes(blob)
        manifest = Manifest(
            name=name,
            encryption="none",
            inputs=tuple(tensor_spec(v) for v in model.graph.input if v.name not in initializers),
            outputs=tuple(tensor_spec(v) for v in model.graph.output),
            shards=specs,
            extra=dict(extra or {}),
        )
        manifest.validate()
        manifest.write(tmp)
    manifest.path = Path(out_dir) / "manifest.json"
    progress(f"wrote {manifest.path} (manifest {manifest.cid})")
    return manifest


def minilm_cuts(num_layers: int, node_shards: int) -> list[str]:
    """Cut tensors for ``node_shards`` node shards of contiguous, near-equal layer ranges."""
    if not 1 <= node_shards <= num_layers:
        raise ValueError(f"--node-shards must be between 1 and {num_layers} (the model's layers)")
    bounds = [round(i * num_layers / node_shards) for i in range(node_shards + 1)]
    return [f"hidden_{b}" for b in bounds]


def import_minilm(out_dir: Path, node_shards: int = 2,
                  progress: Progress = no_progress) -> Manifest:
    check_output_dir(out_dir)
    source = locate()
    cfg = source.config()
    cuts = minilm_cuts(cfg.num_layers, node_shards)  # validate before the slow part
    progress(f"building ONNX encoder from {source.weights} ({PACKAGE} {source.version})")
    model = build_minilm(source)
    extra = {
        "tokenizer": {"path": "tokenizer.json", "cid": cid_of_file(source.tokenizer),
                      "max_length": source.max_seq_length},
        "config": {"family": "bert-encoder", "hidden_size": cfg.hidden_size,
                   "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                   "intermediate_size": cfg.intermediate_size},
        "source": {"package": PACKAGE, "version": source.version,
                   "weights_cid": cid_of_file(source.weights)},
    }
    return write_sharded(model, cuts, out_dir, MODEL_NAME, extra, progress,
                         files={"tokenizer.json": source.tokenizer})



def load_onnx(path: Path) -> onnx.ModelProto:
    """Load and check a user's ONNX file; every failure names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ImportError_(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ImportError_(f"{path}: not an ONNX model (cannot parse protobuf: {exc})") from exc
    if not model.graph.node:
        raise ImportError_(f"{path}: not an ONNX model (the graph has no nodes)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ImportError_(f"{path}: invalid ONNX model: {first}") from exc
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types per failure
        first = str(exc).strip().splitlines()[0]
        raise ImportError_(f"{path}: onnxruntime cannot run this model: {first}") from exc
    return model


def import_onnx(path: Path, cuts: Sequence[str], out_dir: Path,
                progress: Progress = no_progress) -> Manifest:
    check_output_dir(out_dir)
    progress(f"loading {path}")
    model = load_onnx(path)
    name = model.graph.name or Path(path).stem
    extra = {"source": {"file": Path(path).name, "cid": cid_of_file(path)}}
    return write_sharded(model, cuts, out_dir, name, extra, progress)
