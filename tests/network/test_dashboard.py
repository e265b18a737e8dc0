"""The node dashboard (``GET /``, docs/dashboard.md) in a real browser against a real node.

A node process serves the test deployment; Debian's Chromium (/usr/bin/chromium, driven by
playwright without any browser download) opens the page. The page must load without a console
error or an uncaught exception, show the node's DID and its shard CIDs, and its request counter
must grow after a real encrypted query through ``client.Client``. The browser and the node are
stopped also when the test fails. Without /usr/bin/chromium the test fails (``make test``
installs it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from node_helpers import NodeProcess, serving_node

from client import Client
from models import Manifest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
POLL_S = 0.5  # the page's poll interval (?every=)
WAIT_MS = 30_000
TEXTS = ["The dashboard counts this query.", "A second sentence in the same request."]


@contextmanager
def chromium_page(errors: list[str]) -> Iterator[Any]:
    """A headless Chromium page; console errors and uncaught exceptions go to ``errors``.
    The browser is closed on the way out, whatever happened."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: the dashboard test needs Debian's Chromium "
                    "(apt-get install -y chromium; `make test` installs it)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}")
                    if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            page.set_default_timeout(WAIT_MS)
            yield page
        finally:
            browser.close()


def counter(page: Any) -> int:
    text = page.text_content("#requests-total") or ""
    assert text.isdigit(), f"#requests-total shows {text!r}, not a count"
    return int(text)


def test_dashboard_shows_the_node_and_counts_a_query(request: pytest.FixtureRequest,
                                                     deployment_dir: Path,
                                                     tmp_path: Path) -> None:
    node: NodeProcess = serving_node(request, tmp_path / "D", deployment_dir)
    shard_cids = [s.cid for s in Manifest.load(deployment_dir).node_shards]
    errors: list[str] = []
    with chromium_page(errors) as page:
        response = page.goto(f"{node.http}/?every={POLL_S}")
        assert response is not None and response.status == 200
        assert "default-src 'none'" in (response.headers.get("content-security-policy") or "")

        page.wait_for_function("() => /^\\d+$/.test("
                               "document.getElementById('requests-total').textContent)")
        assert page.text_content("#did") == node.info["did"]
        assert page.text_content("#peer-id") == node.peer_id
        shards_text = page.text_content("#shards") or ""
        for cid in shard_cids:
            assert cid in shards_text, f"shard {cid} not on the page: {shards_text!r}"
        assert "update failed" not in (page.text_content("#status") or "")

        before = counter(page)
        started = time.monotonic()
        with Client([node.addr], deployment_dir, verify="none", ledger=False,
                    spot_rate=0.0) as client:
            result = client.embed(TEXTS)
        assert len(result.embeddings) == len(TEXTS)
        stats = httpx.get(f"{node.http}/v1/stats", timeout=10).json()
        served = stats["requests_total"]
        assert served >= before + len(shard_cids), stats  # one infer request per node shard
        assert stats["ledger"] is None and stats["witness"]["refused"] == 0, stats
        page.wait_for_function(
            "n => Number(document.getElementById('requests-total').textContent) > n", arg=before)
        shown_after_s = time.monotonic() - started
        assert counter(page) > before
        assert shown_after_s < WAIT_MS / 1000
        page.wait_for_selector("#chart polyline.req")  # the chart has drawn the counters

    assert errors == [], "the dashboard logged errors:\n" + "\n".join(errors)
    assert httpx.get(f"{node.http}/dashboard/index.html", timeout=10).status_code == 404
    paths = httpx.get(f"{node.http}/openapi.json", timeout=10).json()["paths"]
    assert "/v1/stats" in paths and "/" not in paths
