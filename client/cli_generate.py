"""``veilnet generate``: text from a decoder deployment through the network, streamed.

The generated text goes to stdout as it comes (so it pipes); the hops, verdicts and receipt go
to stderr afterwards (``--quiet`` leaves them out). ``--json`` prints one object instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from client.cli_options import add_network_options, client_options


def _cmd_generate(args: argparse.Namespace) -> int:
    from client.results import GenerateResult, QueryError
    from client.sync_client import Client
    from protocols.transport import quiet_libraries

    quiet_libraries()
    logging.getLogger("veilnet.client").setLevel(logging.ERROR)
    messages = [{"role": "user", "content": args.prompt}] if args.chat else None
    prompt = None if args.chat else args.prompt
    kwargs: dict[str, Any] = {"messages": messages, "max_tokens": args.max_tokens,
                              "temperature": args.temperature, "top_p": args.top_p,
                              "seed": args.seed, "stop": args.stop or ()}
    result: GenerateResult | None
    try:
        with Client(args.bootstrap, args.deployment, **client_options(args)) as client:
            if args.json:
                result = client.generate(prompt, **kwargs)
            else:
                with client.stream(prompt, **kwargs) as stream:
                    for token in stream:
                        if token.text:
                            sys.stdout.write(token.text)
                            sys.stdout.flush()
                result = stream.result
                print()
    except QueryError as exc:
        print(f"\nveilnet: error: {exc}", file=sys.stderr)
        return 1
    assert result is not None
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    if not args.quiet:
        _summary(result, args.verify)
    return 0


def _summary(result: Any, verify: str) -> None:
    err = sys.stderr
    n = len(result.token_ids)
    p50 = result.to_json()["decode_ms_p50"]
    print(f"[{n} tokens, finish: {result.finish_reason}; first token after "
          f"{result.time_to_first_token_s:.2f} s"
          + (f", then {p50:.1f} ms/token" if p50 is not None else "") + "]", file=err)
    for hop in result.hops:
        print(f"  hop {hop.shard_index} {hop.shard_cid[:16]}... on {hop.peer_id} "
              f"({hop.steps} steps, {len(hop.nodes)} node(s), {hop.replays} replay(s), "
              f"signatures verified)", file=err)
        if verify == "full":
            state = "verified at every step" if hop.verified else \
                f"NOT VERIFIED: {hop.unverified_reason}"
            print(f"    verdict: {state}", file=err)
        for verdict in hop.verdicts:
            print(f"    step {verdict['step']}: lost the verdict: "
                  f"{', '.join(verdict['losers'])}", file=err)
        for failure in hop.failures:
            print(f"    dropped: {failure}", file=err)
    if result.receipt is not None:
        print(f"  receipt: entry {result.receipt.index} in the ledger", file=err)
    elif result.receipt_error:
        print(f"  receipt: not logged ({result.receipt_error})", file=err)


def register(sub: Any) -> None:
    gen = sub.add_parser(
        "generate", help="generate text through the network (decoder deployments)",
        description="Generate text with an encrypted decoder deployment (e.g. SmolLM2 from "
                    "'veilnet model import smollm2' then 'veilnet model encrypt'). The token "
                    "embedding, the LM head and sampling run here; nodes run the decoder layers "
                    "and keep the KV cache in sessions (docs/protocol.md). The text streams to "
                    "stdout; hops, verdicts and the receipt follow on stderr.")
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--chat", action="store_true",
                     help="apply the model's chat template with PROMPT as the user message")
    gen.add_argument("--max-tokens", type=int, default=64, metavar="N",
                     help="tokens to generate at most (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T",
                     help="sampling temperature; 0 is greedy (default 0)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P",
                     help="nucleus sampling: keep the most likely tokens up to probability P "
                          "(default 1)")
    gen.add_argument("--seed", type=int, default=None, metavar="S",
                     help="seed for sampling, for repeatable draws")
    gen.add_argument("--stop", action="append", metavar="TEXT",
                     help="stop where TEXT appears (repeatable, at most 4)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object (text, token_ids, prompt_token_ids, "
                          "finish_reason, hops) instead of streaming")
    gen.add_argument("--quiet", action="store_true", help="print only the text")
    add_network_options(gen, "generation")
    gen.set_defaults(func=_cmd_generate)
