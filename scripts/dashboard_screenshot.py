"""A PNG of the node dashboard (``GET /``, docs/dashboard.md) with real figures in it.

    python scripts/dashboard_screenshot.py [--deployment DIR] [--dir T] [--out docs/dashboard.png]

Starts a small local network in a temporary directory (3 nodes, every node shard on 2 of them,
node 0 keeping the ledger; scripts/localnet.py ``Testnet``), opens node 0's dashboard in
Debian's Chromium (/usr/bin/chromium, driven by playwright), runs a few encrypted queries with
``client.Client`` (receipts and score reports go to node 0's ledger, the other nodes' witnesses
cosign it), waits for the rankings, takes the PNG and stops the browser and every node.

Without ``--deployment`` the encrypted MiniLM deployment is built as scripts/testnet.py builds
it, in T/deploy (T defaults to testnet-data/; reused when already there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localnet import DEFAULT_DIR, REPO, Testnet, http_json, prepare_model, stderr_log

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 1000}
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The new movie is awesome.", "A cheetah is running behind its prey."]


def run_queries(net: Testnet, count: int, pause: float) -> None:
    from client import Client

    with Client([net.bootstrap], net.deployment) as client:  # type: ignore[arg-type]
        for q in range(count):
            client.embed([f"query {q}: {s}" for s in SENTENCES[:2 + q % 3]])
            stderr_log(f"query {q + 1} of {count} done")
            time.sleep(pause)


def wait_rankings(http: str, nodes: int, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    rows: list[Any] = []
    while time.monotonic() < deadline:
        rows = http_json(f"{http}/v1/rankings", timeout=5) or []
        if len(rows) >= nodes:
            break
        time.sleep(0.5)
    return rows


def screenshot(net: Testnet, out: Path, queries: int) -> None:
    from playwright.sync_api import sync_playwright

    http = net.nodes[0].http
    assert http is not None
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{http}/?every=1")
            page.wait_for_function("() => /^\\d+$/.test("
                                   "document.getElementById('requests-total').textContent)")
            time.sleep(3)  # a few flat chart points before the queries
            run_queries(net, queries, pause=1.5)
            rows = wait_rankings(http, len(net.nodes), 30)
            stderr_log(f"{len(rows)} ranking rows")
            time.sleep(4)  # a few more polls: the chart, the cosignatures, the rankings
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    if errors:
        raise SystemExit("the dashboard logged errors:\n" + "\n".join(errors))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployment", type=Path, help="an encrypted deployment directory "
                        "(default: build the MiniLM one in T/deploy)")
    parser.add_argument("--dir", type=Path, default=REPO / DEFAULT_DIR,
                        help="T, where the MiniLM deployment is built and kept (default: "
                             "testnet-data/)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--queries", type=int, default=6)
    args = parser.parse_args(argv)
    if not CHROMIUM.is_file():
        parser.error(f"{CHROMIUM} is missing: apt-get install -y chromium")
    deployment = args.deployment
    if deployment is None:
        _, deployment = prepare_model(args.dir, None, stderr_log)
    with tempfile.TemporaryDirectory(prefix="veilnet-dashboard-") as tmp, \
            Testnet(tmp, nodes=3, replicas=2, deployment=deployment, ledger_nodes=(0,)) as net:
        screenshot(net, args.out, args.queries)
    stderr_log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
