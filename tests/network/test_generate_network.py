"""Encrypted text generation through real node processes (SmolLM2-135M-Instruct, ee-decoder/1).

Local testnets (scripts/localnet.py: ``veilnet node start`` processes on 127.0.0.1) serve
the encrypted deployment; the client SDK generates through them and every result is compared
with the plaintext model run in this process (``models.decoding.LocalDecoder`` on the
unencrypted import: an independent computation, no node and no key involved):

- 3 nodes, every node shard on 2 (the session's ``smollm2_net``, tests/conftest.py): greedy
  generation of 32 tokens on varied prompts equals the plaintext model token for token (each
  of the 8 prompts runs 32 tokens through nodes in some test here); ``veilnet generate``
  (streamed and ``--json``); a node SIGKILLed mid-generation, whose hop is replayed on the
  other replica with the same tokens.
- 4 nodes, every node shard on 3, one of them lying (``--byzantine-test-mode noise``) also in
  its sessions: in ``verify=full`` the liar loses the verdict at the first step it takes part
  in, is dropped from the generation, and the tokens still equal the plaintext model's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from node_helpers import veilnet_in_process

from client import Client
from client.generation import Prompt, load_tokenizer
from models import Manifest
from models.decoding import LocalDecoder

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from localnet import Testnet  # noqa: E402

PROMPTS: list[tuple[str, str]] = [
    ("chat", "Write a short poem about the sea."),
    ("chat", "Explain how a rainbow forms."),
    ("plain", "Once upon a time, in a small village by the mountains,"),
    ("chat", "List five fruits and describe each one."),
    ("plain", "def fibonacci(n):"),
    ("chat", "Translate 'good morning' into French, Spanish and German, with a sentence for "
             "each."),
    ("plain", "The history of the printing press begins"),
    ("chat", "Why is the sky blue? Answer in detail."),
]
TOKENS = 32


def args_of(kind: str, text: str) -> dict[str, Any]:
    if kind == "chat":
        return {"messages": [{"role": "user", "content": text}]}
    return {"prompt": text}


@pytest.fixture(scope="module")
def reference(smollm2_reference: LocalDecoder) -> LocalDecoder:
    return smollm2_reference  # loaded once per session (tests/conftest.py)


GREEDY: dict[tuple[int, str, str], list[int]] = {}  # (id(reference), kind, text) -> tokens


def expected(reference: LocalDecoder, kind: str, text: str, n: int = TOKENS) -> list[int]:
    """The plaintext model's first ``n`` greedy tokens. Greedy decoding is deterministic and
    token ``i`` depends only on the prompt and tokens ``< i``, so the first ``n`` tokens of a
    longer run (or all of a run that stopped at EOS sooner) are exactly what a run of ``n``
    tokens gives: each prompt is decoded once, for at least TOKENS tokens, and reused."""
    manifest = reference.pipeline.manifest
    eos = manifest.extra["config"]["eos_token_id"]
    key = (id(reference), kind, text)
    run = GREEDY.get(key)
    if run is None or (len(run) < n and run[-1] != eos):
        a = args_of(kind, text)
        prompt = Prompt.of(load_tokenizer(manifest), manifest, a.get("prompt"),
                           a.get("messages"))
        run = GREEDY[key] = reference.greedy(prompt.ids, max(n, TOKENS), stop=[eos])
    return run[:n]


def node_shards(net: Testnet) -> list[int]:
    """Manifest indexes of the node shards (client re-basing shards stand between them)."""
    assert net.deployment is not None
    return [s.index for s in Manifest.load(net.deployment).node_shards]


@pytest.fixture(scope="module")
def net(smollm2_net: Testnet) -> Testnet:
    """The session's SmolLM2 testnet (tests/conftest.py: 3 nodes, every node shard on 2, node 0
    a ledger node), also queried by test_gateway.py; the kill test restarts its node."""
    return smollm2_net


def test_greedy_generation_equals_the_plaintext_model(net: Testnet,
                                                      reference: LocalDecoder) -> None:
    with Client([net.bootstrap], net.deployment, verify="none", ledger=False,
                timeout=60) as client:
        # PROMPTS[2] and [3] run their 32 tokens through nodes in the kill and liar tests below
        # (same client code, compared with the same reference): not repeated here
        for kind, text in [p for i, p in enumerate(PROMPTS) if i not in (2, 3)]:
            result = client.generate(**args_of(kind, text), max_tokens=TOKENS)
            want = expected(reference, kind, text)
            assert len(want) == TOKENS, (text, want)  # prompts chosen to run 32 tokens
            assert result.token_ids == want, (text, result.text)
            assert result.finish_reason == "length"
            assert result.text == load_tokenizer(reference.pipeline.manifest).decode(
                want, skip_special_tokens=True)
            assert [h.shard_index for h in result.hops] == node_shards(net)
            for hop in result.hops:
                assert hop.steps == TOKENS  # the prompt, then one step per later token
                assert hop.peer_id in {n.peer_id for n in net.nodes}
                assert len(hop.chain) == 64 and len(hop.signature) == 128


def test_streamed_text_is_the_decoded_tokens(net: Testnet, reference: LocalDecoder) -> None:
    kind, text = PROMPTS[0]
    with Client([net.bootstrap], net.deployment, verify="none", ledger=False) as client:
        with client.stream(**args_of(kind, text), max_tokens=16) as stream:
            pieces = [(t.token_id, t.text) for t in stream]
        result = stream.result
    assert result is not None
    assert [i for i, _ in pieces] == expected(reference, kind, text, 16) == result.token_ids
    tokenizer = load_tokenizer(reference.pipeline.manifest)
    assert "".join(p for _, p in pieces) == result.text == tokenizer.decode(
        result.token_ids, skip_special_tokens=True)


def test_veilnet_generate_command(net: Testnet, reference: LocalDecoder,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    veilnet = Path(sys.executable).parent / "veilnet"
    kind, text = PROMPTS[1]
    base = [str(veilnet), "generate", "--bootstrap", net.bootstrap, "--deployment",
            str(net.deployment), "--verify", "full", "--replicas", "2", "--no-ledger",
            "--max-tokens", "12", "--chat", text]
    out = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["token_ids"] == expected(reference, kind, text, 12)
    manifest = reference.pipeline.manifest
    assert doc["prompt_token_ids"] == Prompt.of(load_tokenizer(manifest), manifest, None,
                                                args_of(kind, text)["messages"]).ids
    assert len(doc["hops"]) == 3 and all(h["verified"] for h in doc["hops"])
    streamed = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip() == doc["text"].strip()
    assert "verified at every step" in streamed.stderr
    # the refusal: what the command runs (node.cli.main) called in this process, which saves a
    # Python start-up and the imports (the two runs above are the installed console script)
    bad = veilnet_in_process(capsys, *base[1:-2], "--temperature", "-1", "hi")
    assert bad.returncode != 0 and "temperature" in bad.stderr


def test_a_node_killed_mid_generation_is_replayed_elsewhere(
        net: Testnet, reference: LocalDecoder) -> None:
    kind, text = PROMPTS[2]
    want = expected(reference, kind, text)
    by_peer = {n.peer_id: n for n in net.nodes}
    killed = None
    try:
        with Client([net.bootstrap], net.deployment, verify="none", ledger=False,
                    hop_timeout=10) as client:
            with client.stream(**args_of(kind, text), max_tokens=TOKENS) as stream:
                got = []
                for token in stream:
                    got.append(token.token_id)
                    if len(got) == 8:  # the node holding hop 2's session dies
                        killed = by_peer[stream.holders()[node_shards(net)[1]][0]]
                        os.kill(killed.pid, signal.SIGKILL)
            result = stream.result
        assert result is not None and killed is not None
        assert got == want == result.token_ids
        hop2 = result.hops[1]
        assert hop2.replays >= 1 and killed.peer_id in hop2.nodes
        assert hop2.peer_id != killed.peer_id
        assert any(f.startswith(killed.peer_id) for f in hop2.failures)
    finally:
        if killed is not None:
            net.stop_node(killed.index, kill=True)
            net.start_node(killed.index)


def test_a_lying_node_loses_every_verdict_in_full_mode(
        smollm2_deployment: Path, smollm2_dir: Path, reference: LocalDecoder,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    with Testnet(tmp_path_factory.mktemp("gen-byz"), nodes=4, replicas=3,
                 deployment=smollm2_deployment, model=smollm2_dir, byzantine=1,
                 node_args=["--threads", "1"], timeout=120) as liarnet:
        liar = liarnet.nodes[-1]
        assert liar.byzantine
        with Client([liarnet.bootstrap], liarnet.deployment, verify="full", replicas=3,
                    ledger=False, timeout=60) as client:
            # one generation: with every shard on 3 of 4 nodes and replicas=3, every hop of the
            # shards the liar holds asks it, so a second prompt would repeat the same verdicts
            # (PROMPTS[4]'s 32 tokens are checked in the greedy test)
            for kind, text in PROMPTS[3:4]:
                result = client.generate(**args_of(kind, text), max_tokens=TOKENS)
                assert result.token_ids == expected(reference, kind, text), text
                assert all(h.verified for h in result.hops)
                served = [h for h in result.hops if liar.peer_id in h.nodes]
                assert served, "the liar holds a shard: it must have been asked"
                for hop in served:
                    lost = [v for v in hop.verdicts if liar.peer_id in v["losers"]]
                    assert lost and lost[0]["step"] == 0, hop.verdicts
                    assert hop.peer_id != liar.peer_id
        # spot mode checking every step: a second node replays each step; whenever the liar
        # is one of the two, a third settles it and the liar's session is dropped
        with Client([liarnet.bootstrap], liarnet.deployment, verify="spot", spot_rate=1.0,
                    ledger=False, timeout=60) as client:
            kind, text = PROMPTS[5]
            result = client.generate(**args_of(kind, text), max_tokens=12)
            assert result.token_ids == expected(reference, kind, text, 12)
            for hop in result.hops:
                assert hop.checks >= hop.steps - 1  # the prefill's check opens without history
                if liar.peer_id in hop.nodes:
                    assert any(liar.peer_id in v["losers"] for v in hop.verdicts), hop
                assert hop.peer_id != liar.peer_id


def test_one_receipt_per_generation_is_logged_and_checks(net: Testnet,
                                                        reference: LocalDecoder) -> None:
    from crypto.identity import public_from_did, verify
    from ledger.entries import parse_entry
    from protocols.session import step_payload

    kind, text = PROMPTS[6]
    sizes = []
    with Client([net.bootstrap], net.deployment, verify="full", replicas=2,
                timeout=60) as client:
        for n in (4, 24):
            result = client.generate(**args_of(kind, text), max_tokens=n)
            assert result.token_ids == expected(reference, kind, text, n)
            assert result.receipt is not None, result.receipt_error
            result.receipt.verify()  # log signature, witness quorum, inclusion
            entry = parse_entry(result.receipt.entry)
            sizes.append(len(result.receipt.entry))
            assert entry.type == "generate-receipt/1"
            body = entry.body
            assert body["verdict"] == "accepted"
            assert (body["tokens"], body["prompt_tokens"]) == (
                n, len(result.prompt_token_ids))
            assert [h["index"] for h in body["hops"]] == node_shards(net)
            for hop, record in zip(body["hops"], result.hops, strict=True):
                assert hop["steps"] == n and hop["chain"] == bytes.fromhex(record.chain)
                assert len(hop["nodes"]) == 2
                last = hop["last"]
                signed = step_payload(last["id"], hop["shard"], last["session"],
                                      last["position"], last["input_digest"],
                                      last["output_digest"])
                assert last["position"] == len(result.prompt_token_ids) + n - 2
                assert verify(public_from_did(hop["node"]), last["signature"], signed)
                assert not verify(public_from_did(hop["node"]), last["signature"],
                                  signed.replace(last["output_digest"], bytes(32)))
    # one entry per generation whatever its length: 20 more tokens add no bytes
    assert abs(sizes[1] - sizes[0]) < 16, sizes


def test_an_expired_session_is_replayed_and_the_tokens_stay_the_same(
        smollm2_deployment: Path, smollm2_dir: Path, reference: LocalDecoder,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    import time

    kind, text = PROMPTS[7]
    want = expected(reference, kind, text, 12)
    # one node per shard, sessions idle for more than 1 s expire
    with Testnet(tmp_path_factory.mktemp("gen-expiry"), nodes=3, replicas=1,
                 deployment=smollm2_deployment, model=smollm2_dir,
                 node_args=["--threads", "1", "--session-expiry", "1"], timeout=120) as short, \
            Client([short.bootstrap], short.deployment, verify="none", ledger=False) as client:
        with client.stream(**args_of(kind, text), max_tokens=12) as stream:
            got = []
            for token in stream:
                got.append(token.token_id)
                if len(got) == 5:
                    time.sleep(2.5)  # the client dawdles: every node drops its session
        result = stream.result
    assert result is not None
    assert got == want == result.token_ids
    for hop in result.hops:
        assert hop.replays == 1, hop  # re-opened once, on the same node (the only one)
        assert len(hop.nodes) == 1
        assert any("unknown_session" in f for f in hop.failures), hop.failures
