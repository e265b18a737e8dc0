"""``--record-received DIR``: an audit flag that writes every input a client sends to this node,
which is exactly what the node can see (format and reader: models/received.py).

For each request the node accepts for computation, each received tensor goes to
``DIR/<request id>/<input name>.npy`` (mode 0600, DIR 0700: these are what clients sent) and one
line to ``DIR/index.jsonl``. Writing runs in a worker thread, off the trio event loop, and never
breaks serving: the first I/O error is logged loudly and recording stops, as it does when the
directory would grow past ``max_bytes``; the node keeps serving either way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import trio

from models.received import FORMAT, INDEX_FILE, RecordedInput

log = logging.getLogger("veilnet.node")
DEFAULT_MAX_MB = 1024
NPY_HEADER = 256  # bytes counted for a .npy header (numpy writes 128 or a little more)
MAX_NAME = 80  # characters of a request id or input name kept in a file name
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(name: str) -> str:
    """``name`` as one file name component: only letters, digits, '.', '_' and '-', no leading
    dot, at most MAX_NAME characters, never empty."""
    safe = _UNSAFE.sub("_", name)[:MAX_NAME].lstrip(".")
    return safe or "_"


class ReceivedRecorder:
    """Writes what clients send to ``root``; ``active`` turns False for good on an I/O error or
    when the recording reaches ``max_bytes``. Never raises into the caller."""

    def __init__(self, root: Path | str, max_bytes: int = DEFAULT_MAX_MB << 20) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.used = 0  # bytes in the directory, counted when opened and added as written
        self.active = False
        self._lock = threading.Lock()  # writes run in worker threads, several at once
        try:
            self._open()
            self.active = True
        except OSError as exc:
            self._stop(f"cannot use {self.root}: {exc}")

    def _open(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            if not self.root.is_dir():
                raise NotADirectoryError(f"{self.root} is not a directory") from None
            if self.root.stat().st_mode & 0o077:
                log.warning("--record-received: tightening %s to mode 0700", self.root)
            os.chmod(self.root, 0o700)
        self.used = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def _stop(self, why: str) -> None:
        self.active = False
        log.error("RECORDING STOPPED (--record-received %s): %s; the node keeps serving but "
                  "no longer records what it receives", self.root, why)

    # -- recording ------------------------------------------------------------------------------

    async def record(self, *, protocol: str, op: str, request_id: str, shard: str | None,
                     peer: str | None, inputs: Mapping[str, np.ndarray],
                     session: str | None = None, context: bytes | None = None,
                     ciphertexts: Sequence[bytes] | None = None) -> None:
        """Record one accepted request in a worker thread; never raises (except cancellation)."""
        if not self.active:
            return
        await trio.to_thread.run_sync(lambda: self.record_sync(
            protocol=protocol, op=op, request_id=request_id, shard=shard, peer=peer,
            inputs=inputs, session=session, context=context, ciphertexts=ciphertexts))

    def record_sync(self, *, protocol: str, op: str, request_id: str, shard: str | None,
                    peer: str | None, inputs: Mapping[str, np.ndarray],
                    session: str | None = None, context: bytes | None = None,
                    ciphertexts: Sequence[bytes] | None = None) -> bool:
        """Record one request now (blocking); True when it was written. Never raises."""
        with self._lock:
            if not self.active:
                return False
            try:
                return self._write(protocol, op, request_id, shard, peer, inputs, session,
                                   context, ciphertexts)
            except Exception as exc:  # I/O or anything else: recording must not break serving
                self._stop(f"{type(exc).__name__}: {exc}")
                return False

    def _write(self, protocol: str, op: str, request_id: str, shard: str | None,
               peer: str | None, inputs: Mapping[str, np.ndarray], session: str | None,
               context: bytes | None, ciphertexts: Sequence[bytes] | None) -> bool:
        arrays = {name: np.asarray(a) for name, a in inputs.items()}
        needed = (sum(a.nbytes + NPY_HEADER for a in arrays.values()) + len(context or b"")
                  + sum(len(c) for c in ciphertexts or ()) + 1024)  # 1 KiB for the index line
        if self.used + needed > self.max_bytes:
            self._stop(f"the recording would exceed {self.max_bytes / (1 << 20):g} MB "
                       f"(--record-max-mb): {self.used} bytes used, request {request_id!r} "
                       f"needs about {needed}")
            return False
        folder = self._request_dir(request_id)
        entries: list[RecordedInput] = []
        taken: set[str] = set()
        for name, array in arrays.items():
            file = f"{folder.name}/{_unique(safe_name(name), taken)}.npy"
            with self._create(file) as f:
                np.save(f, array, allow_pickle=False)
            entries.append(RecordedInput(name, file, str(array.dtype), tuple(array.shape)))
        if context is not None:
            file = f"{folder.name}/context.bin"
            with self._create(file) as f:
                f.write(context)
            entries.append(RecordedInput("context", file, "bytes", (len(context),)))
        if ciphertexts is not None:
            file = f"{folder.name}/ciphertexts.bin"
            with self._create(file) as f:
                for blob in ciphertexts:
                    f.write(blob)
            entries.append(RecordedInput("ciphertexts", file, "ckks", (len(ciphertexts),),
                                         tuple(len(c) for c in ciphertexts)))
        line = {"format": FORMAT, "time": round(time.time(), 6), "protocol": protocol, "op": op,
                "request_id": request_id, "shard": shard, "session": session, "peer": peer,
                "inputs": [e.to_json() for e in entries]}
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.root / INDEX_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as f:
            f.write(data)
        self.used += len(data) + sum((self.root / e.file).stat().st_size for e in entries)
        return True

    def _request_dir(self, request_id: str) -> Path:
        """A new directory for one request: its id made safe, with -2, -3, ... when a request
        with the same id was recorded before (ids are the client's choice)."""
        base = safe_name(request_id)
        for n in range(1, 10_000):
            path = self.root / (base if n == 1 else f"{base}-{n}")
            try:
                path.mkdir(mode=0o700)
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"too many recorded requests with id {request_id!r}")

    def _create(self, file: str) -> BinaryIO:
        fd = os.open(self.root / file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return os.fdopen(fd, "wb")


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate.lower() in taken:  # names differing only in case: one file system entry
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate.lower())
    return candidate


__all__ = ["DEFAULT_MAX_MB", "ReceivedRecorder", "safe_name"]
