"""Writing recordings as ``veilnet node start --record-received DIR`` does (node/recorder.py,
format ``veilnet-received/1`` in models/received.py), for the audit's ``--views`` tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_view(root: Path, request_id: str, shard: str, inputs: dict[str, np.ndarray], *,
               op: str = "infer", session: str | None = None) -> None:
    """One request: DIR/<id>/<name>.npy for each input and an index line (``open`` and
    ``step`` ops are session requests, the others infer requests)."""
    (root / request_id).mkdir(parents=True)
    entries = []
    for name, array in inputs.items():
        np.save(root / request_id / f"{name}.npy", array, allow_pickle=False)
        entries.append({"name": name, "file": f"{request_id}/{name}.npy",
                        "dtype": str(array.dtype), "shape": list(array.shape)})
    protocol = "/veilnet/session/1" if op in ("open", "step") else "/veilnet/infer/1"
    line = {"format": "veilnet-received/1", "time": 1764698000.0, "protocol": protocol,
            "op": op, "request_id": request_id, "shard": shard, "session": session,
            "peer": "12D3KooWtest", "inputs": entries}
    with (root / "index.jsonl").open("a") as f:
        f.write(json.dumps(line, separators=(",", ":")) + "\n")
