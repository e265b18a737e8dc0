"""Fuzz a real node's HTTP API from its own OpenAPI schema (schemathesis), over a real socket.

One ``veilnet node start`` process (``--ledger``) serves ``/openapi.json``; schemathesis loads
it from there and, for every operation the schema lists, generates requests (valid and invalid
path and query parameters, headers and bodies), sends them to the node over HTTP on 127.0.0.1
and checks each answer:

- ``not_a_server_error``: never a 5xx (the one documented exception: ``POST /v1/shards/fetch``
  answers 502 when no peer could supply the shards, which needs a valid CID the generator
  practically never writes; it is allowed there and nowhere else);
- ``response_schema_conformance`` and ``content_type_conformance``: an answer whose status the
  schema declares matches the declared body schema and media type.

Half the requests carry the operator's token (``Authorization: Bearer`` from D/api-token), so
``POST /v1/shards/fetch`` is fuzzed past its 401. After the run the node is alive, its
``/healthz`` is ok and ``/metrics`` counts no ``internal`` error.

Budget: ``max_examples`` per operation below (``VEILNET_FUZZ=long``: 20 times more),
``derandomize=True``. The inputs each operation ran are printed at the end of the module and,
with ``VEILNET_FUZZ_NET_REPORT=PATH``, merged into the JSON object at PATH
(``{"http:GET /healthz": 25, ...}``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from node_helpers import NodeProcess, metric_value, start_node, stop_at_teardown
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

LONG = os.environ.get("VEILNET_FUZZ") == "long"
EXAMPLES = 40 * (20 if LONG else 1)  # per operation
COUNTS: Counter[str] = Counter()  # inputs run per operation
STATUSES: dict[str, Counter[int]] = {}
ALLOWED_5XX = {("POST", "/v1/shards/fetch"): {502}}  # documented: no peer could supply them


@pytest.fixture(scope="module")
def http_node(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    """A node with a ledger and no shards (the HTTP routes are the same; building the MiniLM
    deployment would take most of this file's time budget)."""
    return stop_at_teardown(request, start_node(tmp_path_factory.mktemp("fuzzhttp") / "D",
                                                "--ledger", "--request-timeout", "5"))


@pytest.fixture(scope="module")
def api_schema(http_node: NodeProcess) -> Any:
    return schemathesis.openapi.from_url(http_node.http + "/openapi.json")


@pytest.fixture(scope="module")
def api_token(http_node: NodeProcess) -> str:
    return (http_node.data_dir / "api-token").read_text().strip()


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the inputs each operation ran, and merge them into $VEILNET_FUZZ_NET_REPORT."""
    yield
    counts = {f"http:{op}": n for op, n in sorted(COUNTS.items())}
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            reporter.write("\n")
        for op, n in sorted(COUNTS.items()):
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(STATUSES[op].items()))
            line = f"fuzz http:{op}: {n} inputs (status {statuses})"
            if reporter is not None:
                reporter.write_line(line)
            else:
                print(line)
    path = os.environ.get("VEILNET_FUZZ_NET_REPORT")
    if path and counts:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        doc.update(counts)
        Path(path).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def operations(api_schema: Any) -> list[Any]:
    ops = []
    for result in api_schema.get_all_operations():
        ops.append(result.ok())  # an operation the schema cannot describe fails here
    return ops


def cases(operation: Any) -> st.SearchStrategy[Any]:
    """Valid and (where the operation has inputs to break) invalid requests."""
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    with contextlib.suppress(Exception):  # nothing to negate: no parameters or body
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    return st.one_of(strategies)


def fuzz_operation(operation: Any, op: str, api_token: str) -> Any:
    """The hypothesis test of one operation (call it to run it)."""
    allowed = ALLOWED_5XX.get((operation.method.upper(), operation.path), set())

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases(operation))
    def fuzz(case: Any) -> None:
        COUNTS[op] += 1
        headers = {"Authorization": f"Bearer {api_token}"} if COUNTS[op] % 2 else None
        response = case.call(headers=headers, timeout=30)
        STATUSES.setdefault(op, Counter())[response.status_code] += 1
        checks = [response_schema_conformance, content_type_conformance]
        if response.status_code not in allowed:
            checks.append(not_a_server_error)
        case.validate_response(response, checks=checks)
        if op == "POST /a2a":  # the dispatcher answers a bug with JSON-RPC -32603 "internal"
            assert '"internal"' not in response.text, response.text[:2000]

    return fuzz


def test_http_api_never_answers_5xx_and_keeps_to_its_schema(api_schema: Any,
                                                            api_token: str) -> None:
    """Every operation of the served schema, fuzzed in turn; all failures are reported."""
    failures: dict[str, str] = {}
    ops = operations(api_schema)
    assert len(ops) >= 15, [f"{o.method} {o.path}" for o in ops]
    for operation in ops:
        op = f"{operation.method.upper()} {operation.path}"
        try:
            fuzz_operation(operation, op, api_token)()
        except Exception as exc:  # collected, reported together below
            failures[op] = f"{type(exc).__name__}: {exc}"[:3000]
    assert not failures, "\n\n".join(f"{op}: {why}" for op, why in failures.items())
    assert all(COUNTS[f"{o.method.upper()} {o.path}"] for o in ops), COUNTS


def test_the_node_is_healthy_after_the_http_fuzzing(http_node: NodeProcess) -> None:
    assert http_node.proc.poll() is None, f"the node died:\n{http_node.log()[-4000:]}"
    health = httpx.get(http_node.http + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    metrics = httpx.get(http_node.http + "/metrics", timeout=10).text
    assert metric_value(metrics, "veilnet_errors_total", protocol="a2a", code="internal") == 0
    assert "Traceback" not in http_node.log(), http_node.log()[-6000:]


@pytest.mark.parametrize("query", ["checkpoint?size=795720642337819328512",
                                   "proof?index=9223372036854775808",
                                   "consistency?old=0&new=18446744073709551615",
                                   "entries?from=9223372036854775808"])
def test_ledger_numbers_past_64_bits_get_422_not_500(http_node: NodeProcess, query: str) -> None:
    """Found by the fuzzing: a size past SQLite's integers was an OverflowError (500)."""
    r = httpx.get(f"{http_node.http}/ledger/{query}", timeout=10)
    assert r.status_code == 422, r.text
    assert "9223372036854775807" in r.text


def test_a_fetch_body_that_is_not_utf8_gets_422_not_500(http_node: NodeProcess,
                                                         api_token: str) -> None:
    """Found by the fuzzing: the 422 echoed the raw body, which FastAPI could not encode."""
    r = httpx.post(http_node.http + "/v1/shards/fetch", content=b"\x16\x9c\x1c5\xeeb\xb6\t",
                   headers={"Authorization": f"Bearer {api_token}",
                            "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["type"] == "json_invalid"


def test_card_filters_that_are_not_cids_get_400(http_node: NodeProcess) -> None:
    """GET /v1/agents checks its filters as /veilnet/cards/1 does (docs/protocol.md, Limits):
    it used to answer 200 and an empty list to any string."""
    for query in ("shard=not-a-cid", "deployment=" + "z" * 5000, "model=" + "m" * 201):
        r = httpx.get(f"{http_node.http}/v1/agents?{query}", timeout=10)
        assert r.status_code == 400, (query[:40], r.text)
        assert r.json()["detail"]["reason"] == "bad_request"
    cid = "bafkrei" + "a" * 52
    for query in (f"shard={cid}", f"deployment={cid}", "model=minilm"):
        r = httpx.get(f"{http_node.http}/v1/agents?{query}", timeout=10)
        assert r.status_code == 200 and r.json() == [], (query, r.text)
    everyone = httpx.get(f"{http_node.http}/v1/agents", timeout=10).json()
    assert everyone  # the node's own card
    r = httpx.get(f"{http_node.http}/v1/agents?model=&shard=", timeout=10)  # empty: no filter
    assert r.status_code == 200 and r.json() == everyone, r.text
