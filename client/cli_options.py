"""Options shared by the commands that run through the network (``query``, ``generate``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from consensus.verdict import VERIFY_MODES
from protocols.transport import DIAL_TIMEOUT as DEFAULT_CONNECT_TIMEOUT


def add_network_options(parser: argparse.ArgumentParser, what: str,
                        multi: bool = False) -> None:
    """The options every command that runs through the network takes (``multi``: repeatable
    ``--deployment [ID=]DEPLOY``, kept as strings)."""
    parser.add_argument("--bootstrap", action="append", required=True, metavar="MULTIADDR",
                        help="a node's multiaddr ending in /p2p/<PeerID> (repeatable)")
    if multi:
        parser.add_argument("--deployment", required=True, action="append",
                            metavar="[ID=]DEPLOY",
                            help="encrypted deployment directory, its client/ holding the "
                                 "secret client shards (repeatable); ID is the model id "
                                 "clients ask for (default: the model's name)")
    else:
        parser.add_argument("--deployment", required=True, type=Path, metavar="DEPLOY",
                            help="encrypted deployment directory; its client/ holds the "
                                 "secret client shards")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help=f"limit for the whole {what} (default 120)" if what == "query"
                        else "limit for the prompt and for each token (default 120)")
    parser.add_argument("--hop-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="limit for one node's answer before trying another (default 30)")
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                        metavar="SECONDS",
                        help="limit for one dial of a node (TCP, Noise, yamux; default "
                             f"{DEFAULT_CONNECT_TIMEOUT:g}: a slow lossy link needs seconds, "
                             "docs/reliability.md)")
    parser.add_argument("--verify", choices=VERIFY_MODES, default="full",
                        help="consensus checks: full (each hop on --replicas nodes, majority "
                             "wins), spot (a second node checks with probability --spot-rate), "
                             "none (default full; docs/consensus.md)")
    parser.add_argument("--replicas", type=int, default=3, metavar="R",
                        help="nodes per hop in full mode (default 3, at least 2)")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="in full mode, when fewer than two nodes answer a hop, return the "
                             "single answer marked unverified (a warning on stderr) instead of "
                             "failing")
    parser.add_argument("--spot-rate", type=float, default=0.1, metavar="P",
                        help="probability of a check per hop in spot mode (default 0.1)")
    parser.add_argument("--ledger", action=argparse.BooleanOptionalAction, default=True,
                        help=f"log a signed receipt of the {what} and this client's score report "
                             "at a ledger node, when the network has one, and print the receipt "
                             "with its tlog-proof (default; --no-ledger turns it off)")
    parser.add_argument("--quorum", type=int, default=1, metavar="N",
                        help="witness cosignatures the receipt's checkpoint needs (default 1)")


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """``Client`` keyword arguments from the options ``add_network_options`` adds."""
    return {"timeout": args.timeout, "hop_timeout": args.hop_timeout,
            "connect_timeout": args.connect_timeout, "ledger": args.ledger,
            "witness_quorum": args.quorum, "verify": args.verify, "replicas": args.replicas,
            "spot_rate": args.spot_rate, "allow_unverified": args.allow_unverified}
