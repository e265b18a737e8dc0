"""Fair service (node/fair.py) on a real node: one peer floods it at full speed
(scripts/flood.py, its own process and PeerID, 16 streams back to back) while an honest client
sends the same valid requests one at a time. The honest client is never refused, every answer
is right and signed, and its median latency stays within 2x of its unloaded median; the
flooder is served in its turn, its requests beyond its share wait unread, and any refusal it
gets names its limit and is counted in /metrics.
"""

from __future__ import annotations

import statistics
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import trio
from libp2p.abc import IHost
from node_helpers import ClientThread, NodeProcess, metric_value, serving_node
from protocol_fixtures import Hop, check_valid_response

from protocols import INFER
from protocols.transport import connect, peer_info
from protocols.wire import encode_frame, read_frame

pytest_plugins = ["protocol_fixtures"]
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from flood import flooding  # noqa: E402

ASKS = 15  # honest requests per phase


@pytest.fixture(scope="module")
def fair_node(request: pytest.FixtureRequest, deployment_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    return serving_node(request, tmp_path_factory.mktemp("fair") / "D", deployment_dir,
                        "--capacity", "1", "--threads", "1")


def honest_latencies(client: ClientThread, node: NodeProcess, hop: Hop) -> list[float]:
    """``ASKS`` requests one after another on one stream, each answer checked; seconds each."""
    async def main(host: IHost) -> list[tuple[float, dict, dict]]:
        info = peer_info(node.addr)
        await connect(host, info, 10)
        stream = await host.new_stream(info.peer_id, [INFER])
        timed = []
        for _ in range(ASKS):
            message = hop.request()
            started = time.perf_counter()
            await stream.write(encode_frame(message))
            with trio.fail_after(30):
                response = await read_frame(stream)
            timed.append((time.perf_counter() - started, message, response))
        await stream.close()
        return timed

    timed = client.run(main)
    for _, message, response in timed:
        check_valid_response(response, message, hop, node)  # never busy, always right
    return [seconds for seconds, _, _ in timed]


def test_a_flooding_peer_does_not_starve_an_honest_one(fair_node: NodeProcess, hop: Hop,
                                                        client: ClientThread,
                                                        deployment_dir: Path) -> None:
    honest_latencies(client, fair_node, hop)  # warm up: session loaded, connection open
    unloaded = statistics.median(honest_latencies(client, fair_node, hop))

    with flooding(fair_node.addr, deployment_dir, seconds=8) as finish:
        flooded = honest_latencies(client, fair_node, hop)
        report = finish()
    answers = report["answers"]
    ratio = statistics.median(flooded) / unloaded
    print(f"honest p50 unloaded {unloaded * 1e3:.1f} ms, flooded "
          f"{statistics.median(flooded) * 1e3:.1f} ms ({ratio:.2f}x); flooder {report}")
    assert answers.get("ok", 0) > 0, report  # the flooder is served too, in its turn
    # 16 streams, one over its share of requests in hand: the streams over it wait unread
    # (flow control) rather than being refused; a refusal names its limit and is counted
    with urllib.request.urlopen(f"{fair_node.http}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    for answer, count in answers.items():
        assert answer in ("ok", "busy:peer_queue", "busy:peer_streams"), report
        if answer.startswith("busy:"):
            reason = answer.split(":", 1)[1]
            assert metric_value(metrics, "veilnet_busy_total", reason=reason) == count
    assert ratio <= 2.0, (unloaded, flooded, report)
    assert fair_node.proc.poll() is None
