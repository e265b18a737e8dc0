"""The text-generation part of ``make demo`` (scripts/testnet.py demo): a 3-node testnet serving
encrypted SmolLM2-135M-Instruct, one chat answer streamed through it with every step checked on
two nodes, compared token for token with the plaintext model run in this process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from localnet import Testnet, short

QUESTION = "What is the capital of France? Answer in one sentence."
MAX_TOKENS = 40


def demo_generate(root: Path, timeout: float) -> bool:
    """Run the generation demo in ``root`` (T/smollm2/ holds the model); True when the network's
    tokens equal the plaintext model's."""
    from client import Client
    from client.generation import Prompt, load_tokenizer
    from models.decoding import LocalDecoder

    print("\nText generation: SmolLM2-135M-Instruct, encrypted (ee-decoder/1), on 3 nodes with "
          "every node shard on 2.\nThe client embeds, samples and holds the LM head; nodes run "
          "the decoder layers and keep the KV cache.")
    net = Testnet(root, nodes=3, replicas=2, kind="smollm2",
                  node_args=["--threads", "1"], timeout=timeout)
    try:
        net.start()
        by_peer = {n.peer_id: n.index for n in net.nodes}
        messages = [{"role": "user", "content": QUESTION}]
        print(f"\n  user: {QUESTION}\n  assistant (streamed through the network): ", end="",
              flush=True)
        started = time.perf_counter()
        with Client([net.bootstrap], net.deployment, verify="full",  # type: ignore[arg-type]
                    replicas=2) as client:
            with client.stream(messages=messages, max_tokens=MAX_TOKENS) as stream:
                for token in stream:
                    print(token.text, end="", flush=True)
            result = stream.result
        elapsed = time.perf_counter() - started
        print()
        assert result is not None and net.model is not None
        _print_result(result, by_peer, elapsed)
        reference = LocalDecoder(net.model, spin=False)
        manifest = reference.pipeline.manifest
        prompt = Prompt.of(load_tokenizer(manifest), manifest, None, messages)
        want = reference.greedy(prompt.ids, MAX_TOKENS,
                                stop=[manifest.extra["config"]["eos_token_id"]])
        same = want == result.token_ids
        print(f"  same {len(want)} tokens as the plaintext model run here: "
              f"{'yes' if same else 'NO'}")
        return same
    finally:
        net.stop()


def _print_result(result: Any, by_peer: dict[str, int], elapsed: float) -> None:
    p50 = result.to_json()["decode_ms_p50"]
    print(f"  {len(result.token_ids)} tokens ({result.finish_reason}) in {elapsed:.1f} s with "
          f"the client start; first token after {result.time_to_first_token_s:.2f} s, then "
          f"{p50:.0f} ms/token at p50")
    for hop in result.hops:
        nodes = ", ".join(f"node {by_peer.get(p, '?')}" for p in hop.nodes)
        print(f"  hop shard {hop.shard_index} ({hop.shard_cid[:12]}...): sessions on {nodes}; "
              f"{hop.steps} steps, " + ("every step verified (2 of 2 agree)" if hop.verified
                                        else f"NOT verified: {hop.unverified_reason}"))
        for failure in hop.failures:
            peer, _, reason = failure.partition(": ")
            print(f"    dropped node {by_peer.get(peer, short(peer))}: {reason}")
    receipt = result.receipt
    if receipt is not None:
        checkpoint = receipt.verify()
        print(f"  receipt: one generate-receipt/1 entry ({len(receipt.entry)} bytes, a chain "
              f"digest over every step), index {receipt.index} of node 0's ledger (tree size "
              f"{checkpoint.size}), cosigned by >= {receipt.quorum} witness(es); verified "
              "offline")
    else:
        print(f"  receipt: not logged ({result.receipt_error})")
