"""``veilnet gateway`` (client/gateway.py) against real testnets, driven by the official
``openai`` Python package: two local testnets (MiniLM, every node shard on 2 nodes with a
ledger node; SmolLM2, 3 nodes, every node shard on 2: the session's ``smollm2_net``, shared with
test_generate_network.py, tests/conftest.py), one gateway process serving both plus a
masked MiniLM deployment no node serves. Answers are compared with the plaintext models run in
this process (an independent computation: no node, no key): embeddings within 1e-4, greedy
text token for token. Then errors in OpenAI's shape (the gateway keeps serving), concurrent
clients, the bearer key, and the refusal to bind a non-loopback address without one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from client.generation import Prompt, load_tokenizer
from models import Manifest, Pipeline
from models.decoding import LocalDecoder

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from localnet import Testnet  # noqa: E402

TEXTS = ["A man is eating food.", "The gateway keeps the key on this machine."]
CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]
TOKENS = 8
KEY = "veilnet-test-key-0123456789"


class Gateway:
    """A ``veilnet gateway`` process; ``url`` once it printed that it serves."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "node", "gateway", *args], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = ""
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr or []),
                         daemon=True).start()

    def wait(self, limit: float = 120) -> Gateway:
        deadline = time.monotonic() + limit
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if match := re.search(r"serving (http://\S+)/v1", line):
                self.url = match.group(1)
                return self
        self.stop()
        raise AssertionError(f"the gateway did not start: {''.join(self.err)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory, deployment_dir: Path, minilm_dir: Path,
         smollm2_net: Testnet) -> Iterator[tuple[Testnet, Testnet]]:
    """(MiniLM testnet, SmolLM2 testnet); the SmolLM2 one is the session's (only queried)."""
    root = tmp_path_factory.mktemp("gateway")
    with Testnet(root / "minilm", nodes=2, replicas=2, deployment=deployment_dir,
                 model=minilm_dir, node_args=["--threads", "1"], log=lambda _: None) as enc:
        yield enc, smollm2_net


@pytest.fixture(scope="module")
def gateway(nets: tuple[Testnet, Testnet], deployment_dir: Path, smollm2_deployment: Path,
            masked_deployment: Path) -> Iterator[Gateway]:
    enc, dec = nets
    gw = Gateway("--bootstrap", enc.bootstrap, "--bootstrap", dec.bootstrap,
                 "--deployment", f"minilm={deployment_dir}",
                 "--deployment", f"smollm2={smollm2_deployment}",
                 "--deployment", f"unserved={masked_deployment}",
                 "--listen", "127.0.0.1:0", "--replicas", "2", "--hop-timeout", "20")
    try:
        yield gw.wait()
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def api(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def reference(smollm2_reference: LocalDecoder) -> LocalDecoder:
    return smollm2_reference  # loaded once per session (tests/conftest.py)


def greedy_text(reference: LocalDecoder, prompt: str | None,
                messages: list[dict[str, str]] | None) -> tuple[str, int, list[int]]:
    """``(text, prompt tokens, generated ids)`` of the plaintext model, greedy, TOKENS long."""
    manifest = reference.pipeline.manifest
    tok = load_tokenizer(manifest)
    first = Prompt.of(tok, manifest, prompt, messages)
    ids = reference.greedy(first.ids, TOKENS, stop=[manifest.extra["config"]["eos_token_id"]])
    return tok.decode(ids, skip_special_tokens=True), len(first.ids), ids


def test_models_are_listed_by_the_ids_given(api: openai.OpenAI, deployment_dir: Path) -> None:
    models = {m.id: m for m in api.models.list()}
    assert set(models) == {"minilm", "smollm2", "unserved"}
    extra = models["minilm"].model_extra or {}
    assert extra["veilnet"]["deployment"] == Manifest.load(deployment_dir).cid
    assert extra["veilnet"]["endpoints"] == ["/v1/embeddings"]


def test_embeddings_equal_the_plaintext_model(api: openai.OpenAI, minilm_dir: Path,
                                              nets: tuple[Testnet, Testnet]) -> None:
    plain = Pipeline(minilm_dir)
    got = api.embeddings.create(model="minilm", input=TEXTS)  # the package asks for base64
    assert [d.index for d in got.data] == [0, 1]
    vectors = np.array([d.embedding for d in got.data])
    assert np.abs(vectors - plain.embed(TEXTS)).max() <= 1e-4
    one = api.embeddings.create(model="minilm", input=TEXTS[0], encoding_format="float")
    assert np.abs(np.array(one.data[0].embedding) - plain.embed(TEXTS[:1])[0]).max() <= 1e-4
    assert got.usage.prompt_tokens > len(" ".join(TEXTS).split())
    evidence = (got.model_extra or {})["veilnet"]
    dids = {n.did for n in nets[0].nodes}
    assert evidence["verified"] is True and evidence["hops"]
    assert all(h["node_did"] in dids and h["verdict"]["decided"] for h in evidence["hops"])
    assert evidence.get("receipt") or evidence.get("receipt_pending")


def test_chat_and_completions_equal_greedy_plaintext(api: openai.OpenAI,
                                                     reference: LocalDecoder) -> None:
    text, prompt_tokens, ids = greedy_text(reference, None, CHAT)
    chat = api.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=TOKENS,
                                       temperature=0)
    assert chat.choices[0].message.content == text
    assert chat.choices[0].finish_reason == ("length" if len(ids) == TOKENS else "stop")
    assert chat.usage is not None and (chat.usage.prompt_tokens, chat.usage.completion_tokens) \
        == (prompt_tokens, len(ids))
    hops = (chat.model_extra or {})["veilnet"]["hops"]
    assert hops and all(h["verified"] for h in hops)

    chunks = list(api.chat.completions.create(
        model="smollm2", messages=CHAT, max_tokens=TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == chat.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(ids)

    prompt = "Once upon a time, in a small village by the mountains,"
    plain_text, _, _ = greedy_text(reference, prompt, None)
    done = api.completions.create(model="smollm2", prompt=prompt, max_tokens=TOKENS,
                                  temperature=0)
    assert done.choices[0].text == plain_text
    pieces = list(api.completions.create(model="smollm2", prompt=prompt, max_tokens=TOKENS,
                                         temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == plain_text


def test_errors_have_openai_shape_and_the_gateway_keeps_serving(
        api: openai.OpenAI, gateway: Gateway, smollm2_deployment: Path) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        api.embeddings.create(model="no-such-model", input="x")
    assert info.value.code == "model_not_found" and "minilm" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="smollm2", messages=CHAT, temperature=7)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=10**6)
    assert info.value.param == "max_tokens" and "4096" in info.value.message
    context = Manifest.load(smollm2_deployment).extra["config"]["context_length"]
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="smollm2", max_tokens=64, messages=[
            {"role": "user", "content": "hello " * context}])
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        api.embeddings.create(model="smollm2", input="x")
    assert info.value.code == "wrong_endpoint"
    with pytest.raises(openai.BadRequestError) as info:
        api.embeddings.create(model="minilm", input=[])
    assert info.value.param == "input"
    with pytest.raises(openai.InternalServerError) as info:  # 503: nobody serves it
        api.embeddings.create(model="unserved", input="x")
    assert info.value.status_code == 503 and info.value.code == "no_nodes"
    raw = httpx.post(f"{gateway.url}/v1/embeddings", content=b"{not json", timeout=10)
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    assert api.embeddings.create(model="minilm", input="still serving").data


def test_concurrent_clients(gateway: Gateway, minilm_dir: Path) -> None:
    plain = Pipeline(minilm_dir)
    texts = [f"client {i} asks about item {i * 7}" for i in range(6)]
    out: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0,
                                   timeout=120)
            got = client.embeddings.create(model="minilm", input=texts[i])
            out[i] = np.array(got.data[0].embedding)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    expected = plain.embed(texts)
    assert all(np.abs(out[i] - expected[i]).max() <= 1e-4 for i in range(len(texts)))


def test_api_key_and_loopback_rule(nets: tuple[Testnet, Testnet], deployment_dir: Path,
                                   tmp_path: Path) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "node", "gateway", "--bootstrap", nets[0].bootstrap,
         "--deployment", str(deployment_dir), "--listen", "0.0.0.0:0"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--api-key-file" in refused.stderr
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    os.chmod(key_file, 0o644)
    loose = subprocess.run(
        [sys.executable, "-m", "node", "gateway", "--bootstrap", nets[0].bootstrap,
         "--deployment", str(deployment_dir), "--api-key-file", str(key_file)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert loose.returncode == 2 and "chmod 600" in loose.stderr
    os.chmod(key_file, 0o600)
    gw = Gateway("--bootstrap", nets[0].bootstrap, "--deployment", str(deployment_dir),
                 "--listen", "127.0.0.1:0", "--api-key-file", str(key_file), "--verify",
                 "none", "--no-ledger")
    try:
        gw.wait()
        wrong = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.models.list()
        assert info.value.code == "invalid_api_key"
        right = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)
        name = Manifest.load(deployment_dir).name
        assert [m.id for m in right.models.list()] == [name]  # default id: the model's name
        got = right.embeddings.create(model=name, input=TEXTS[0])
        assert len(got.data[0].embedding) == 384
    finally:
        gw.stop()


def test_a_query_over_its_time_limit_is_a_504(nets: tuple[Testnet, Testnet],
                                              deployment_dir: Path) -> None:
    gw = Gateway("--bootstrap", nets[0].bootstrap, "--deployment", f"minilm={deployment_dir}",
                 "--listen", "127.0.0.1:0", "--timeout", "0.001", "--verify", "none",
                 "--no-ledger")
    try:
        gw.wait()
        api = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as info:
            api.embeddings.create(model="minilm", input=TEXTS[0])
        assert info.value.status_code == 504 and info.value.code == "timeout"
        assert [m.id for m in api.models.list()] == ["minilm"]  # still serving
    finally:
        gw.stop()
