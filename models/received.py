"""What a node received, as ``veilnet node start --record-received DIR`` writes it (the writer is
node/recorder.py): the format, and ``read_views`` to read it back (``veilnet audit --views``).

``DIR/index.jsonl`` holds one JSON object a line, one per request the node accepted for
computation (docs/protocol.md, "Files a node writes")::

    {"format": "veilnet-received/1", "time": 1764698000.12, "protocol": "/veilnet/infer/1",
     "op": "infer", "request_id": "...", "shard": "<CID>", "session": null, "peer": "<PeerID>",
     "inputs": [{"name": "hidden", "file": "<dir>/hidden.npy", "dtype": "float32",
                 "shape": [2, 16, 384]}]}

``op`` is ``infer``, ``infer-mask-seed`` (masked/1: the masks the node drew from the seeds it
received, which it holds as surely as if they had been sent), ``open`` or ``step``; ``session``
names the session of ``open`` and ``step`` (null for ``infer``). Each input's ``file`` is
relative to DIR: a ``.npy`` file (``numpy.save``, no pickles) for a tensor; for a CKKS request,
``context.bin`` (dtype ``bytes``: the public TenSEAL context) and ``ciphertexts.bin`` (dtype
``ckks``: the serialized vectors one after another, their lengths in ``sizes``).

This module reads only; models/ may be imported by node/ and by the audit tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from errors import InputError

FORMAT = "veilnet-received/1"
INDEX_FILE = "index.jsonl"
OPS = ("infer", "infer-mask-seed", "open", "step")


class ReceivedFormatError(InputError):
    """A recording directory that is not in the ``veilnet-received/1`` format."""


@dataclass(frozen=True)
class RecordedInput:
    name: str
    file: str  # relative to the recording directory
    dtype: str  # a numpy dtype name; "bytes" or "ckks" for the .bin files of CKKS requests
    shape: tuple[int, ...]
    sizes: tuple[int, ...] | None = None  # "ckks": the length of each serialized vector

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "file": self.file, "dtype": self.dtype,
                                 "shape": list(self.shape)}
        if self.sizes is not None:
            entry["sizes"] = list(self.sizes)
        return entry


@dataclass(frozen=True)
class RecordedView:
    """One request as the node saw it: an index line and the directory its files are in."""

    root: Path
    time: float
    protocol: str
    op: str
    request_id: str
    shard: str | None
    session: str | None
    peer: str | None
    inputs: tuple[RecordedInput, ...]

    def to_json(self) -> dict[str, Any]:
        """The index line (without ``root``)."""
        return {"format": FORMAT, "time": self.time, "protocol": self.protocol, "op": self.op,
                "request_id": self.request_id, "shard": self.shard, "session": self.session,
                "peer": self.peer, "inputs": [i.to_json() for i in self.inputs]}

    def load(self) -> dict[str, Any]:
        """The received inputs by name: numpy arrays for tensors; for CKKS requests ``context``
        as bytes and ``ciphertexts`` as a list of bytes."""
        out: dict[str, Any] = {}
        for item in self.inputs:
            path = self.root / item.file
            if item.file.endswith(".npy"):
                out[item.name] = np.load(path, allow_pickle=False)
                continue
            data = path.read_bytes()
            if item.sizes is None:
                out[item.name] = data
                continue
            if sum(item.sizes) != len(data):
                raise ReceivedFormatError(f"{path}: {len(data)} bytes, the index says "
                                          f"{sum(item.sizes)}")
            parts, start = [], 0
            for size in item.sizes:
                parts.append(data[start:start + size])
                start += size
            out[item.name] = parts
        return out


def read_views(root: Path | str) -> list[RecordedView]:
    """Every request recorded in ``root`` (a ``--record-received`` directory), in the order the
    node wrote them. A last line cut short (the node stopped while writing it) is skipped;
    anything else malformed raises ReceivedFormatError."""
    root = Path(root)
    try:
        text = (root / INDEX_FILE).read_text(encoding="utf-8")
    except OSError as exc:
        raise ReceivedFormatError(f"{root}: no readable {INDEX_FILE} ({exc.strerror})") from exc
    lines = text.split("\n")
    if lines and lines[-1] != "":
        lines = lines[:-1]  # no newline yet: a line being written when the node stopped
    views = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                views.append(_view(root, json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                raise ReceivedFormatError(f"{root / INDEX_FILE}:{number}: {exc}") from None
    return views


def _view(root: Path, line: Any) -> RecordedView:
    if not isinstance(line, dict) or line.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} line")
    if line["op"] not in OPS:
        raise ValueError(f"op {line['op']!r}")
    inputs = []
    for entry in line["inputs"]:
        file = PurePosixPath(entry["file"])
        if file.is_absolute() or ".." in file.parts or not file.parts:
            raise ValueError(f"file {entry['file']!r} is not inside the directory")
        sizes = entry.get("sizes")
        inputs.append(RecordedInput(str(entry["name"]), str(file), str(entry["dtype"]),
                                    tuple(int(d) for d in entry["shape"]),
                                    tuple(int(s) for s in sizes) if sizes is not None else None))
    return RecordedView(root, float(line["time"]), str(line["protocol"]), line["op"],
                        str(line["request_id"]), _opt(line.get("shard")),
                        _opt(line.get("session")), _opt(line.get("peer")), tuple(inputs))


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)


__all__ = ["FORMAT", "INDEX_FILE", "ReceivedFormatError", "RecordedInput", "RecordedView",
           "read_views"]
