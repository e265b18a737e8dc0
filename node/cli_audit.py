"""``veilnet audit DEPLOY``: what a node serving a deployment can read, measured
(models/audit.py; docs/threat-model.md, "Auditing a deployment")."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _progress(message: str) -> None:
    print(f"veilnet: audit: {message}", file=sys.stderr, flush=True)


def _cmd_audit(args: argparse.Namespace) -> int:
    if args.views is not None:
        from models.audit_views import audit_views

        report = audit_views(args.deploy, args.views, args.model, progress=_progress)
    else:
        from models.audit import audit_deployment

        report = audit_deployment(args.deploy, args.model, sample=args.sample, seed=args.seed,
                                  progress=_progress)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(report.table())
    return 0


def register(sub: Any) -> None:
    audit = sub.add_parser(
        "audit", help="measure what a node serving a deployment can read",
        description="Run the known attacks on an encrypted deployment as a node would (its "
                    "encrypted shards, what the client sends it for held-out text, the public "
                    "plaintext weights, exact or perturbed as by a fine-tune) and score them "
                    "with DEPLOY/client/key.json, which the attacks never see. A masked/1 "
                    "deployment (no key) gets its own suite: nearest embedding, norms and "
                    "linear probes on the masked inputs x + r, averaging repeated queries, "
                    "length, and the collusion of the two nodes of a pair, with the "
                    "manifest's information bound. Prints one row per attack: the success "
                    "rate, the best constant guess's, and a note.")
    audit.add_argument("deploy", type=Path, metavar="DEPLOY",
                       help="deployment directory (with client/key.json; masked/1: with "
                            "client/)")
    audit.add_argument("--model", type=Path, default=None, metavar="PLAIN_DIR",
                       help="the plaintext model directory the deployment was encrypted from "
                            "(default: re-import all-MiniLM-L6-v2 or SmolLM2-135M-Instruct "
                            "from its package when the manifest names one)")
    audit.add_argument("--sample", type=int, default=200, metavar="N",
                       help="held-out sentences (Python's own help texts; default 200)")
    audit.add_argument("--seed", type=int, default=15,
                       help="seed of the sentence sample and the perturbations (default 15)")
    audit.add_argument("--views", type=Path, default=None, metavar="DIR", action="append",
                       help="attack exactly what a node recorded with `veilnet node start "
                            "--record-received DIR` instead of simulated traffic; repeat it "
                            "for several nodes' recordings. ee-encoder/1 and ee-decoder/1: "
                            "the first node shard's views read with the key recovered from the "
                            "public weights, later shards' by decrypt-then-probe, scored "
                            "against what the owner reads with client/key.json (a later view "
                            "is scored when the recording of the first shard's node holds the "
                            "text it continues); masked/1: each node's views alone, and each "
                            "pair of nodes pooled, scored against x = (x + r) - r, so pass the "
                            "recordings of both nodes of a pair")
    audit.add_argument("--json", action="store_true",
                       help='print one JSON object {"deployment", "scheme", "rows"} (and '
                            '"views" with --views, "bound" for masked/1)')
    audit.set_defaults(func=_cmd_audit)


__all__ = ["register"]
