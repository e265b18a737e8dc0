"""Loading an encrypted deployment on the client side: the client shards ARE the secret.

``veilnet model encrypt`` folds the EE key into the client head and tail (DEPLOY/client/*.onnx),
so whoever can read those files can undo the transform of every activation a node sees; a query
never reads ``client/key.json`` (that file is kept for ``veilnet model verify`` and audits, and
is just as secret). The deployment writes client/ 0700 and every file in it 0600. Before it
runs anything the client checks that:

- no client shard, and no key.json, is readable or writable by the group or others (else
  ``SecretFileError`` naming the file, its mode and the chmod that fixes it);
- every client shard hashes to its CID in the manifest (else ``ManifestError``; checked by
  ``Pipeline``).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from models import Manifest, ManifestError, Pipeline

log = logging.getLogger("veilnet.client")
KEY_FILE = "key.json"


class SecretFileError(ManifestError):
    """A client shard or key file that others than its owner can read or write."""


def check_secret_files(manifest: Manifest) -> None:
    """Refuse client shards (and the key file) with group or world permissions."""
    if os.name == "nt":  # no POSIX modes to check
        return
    paths = [manifest.shard_path(s) for s in manifest.shards if s.role != "node"]
    if manifest.path is not None:
        key = manifest.path.parent / "client" / KEY_FILE
        if key.exists():
            paths.append(key)
    for path in paths:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue  # reported as a missing shard by the CID check
        if mode & 0o077:
            what = "the EE key" if path.name == KEY_FILE else "a client shard (the key is "\
                                                               "folded into it)"
            raise SecretFileError(
                f"{path} is {what} and has mode {mode:04o}, readable or writable by others; "
                f"it must be private to you: chmod 600 {path} (and chmod 700 {path.parent})")


def load_pipeline(deployment: Path, threads: int | None) -> Pipeline:
    """The deployment's client head and tail, ready to run (node shards run on nodes)."""
    manifest = Manifest.load(deployment)
    if manifest.encryption == "none":
        log.warning("%s is not EE-encrypted: nodes see plaintext activations unless the "
                    "query runs in CKKS mode (run_ckks)", deployment)
    else:
        check_secret_files(manifest)
    if not manifest.node_shards:
        raise ManifestError(f"{deployment}: the deployment has no node shards")
    # Pipeline hashes every client shard against its CID in the manifest before loading it.
    # spin=False: busy-waiting onnxruntime threads here would steal the cores of nodes
    # running on the same machine (the testnet) while the client waits for them.
    return Pipeline(manifest, threads=threads, spin=False, remote_nodes=True)


__all__ = ["KEY_FILE", "SecretFileError", "check_secret_files", "load_pipeline"]
