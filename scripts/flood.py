"""Flood one node with valid infer requests from a single peer, as fast as it answers.

For operators checking that their node stays fair (node/fair.py) and for tests and benchmarks
(tests/network/test_fair_service.py, bench/fairness.py)::

    flood.py --node MULTIADDR --deployment DIR [--streams 16] [--seconds 10] [--texts 2]

The request is a real one: the deployment's client head shard runs on ``--texts`` sentences and
its outputs are sent to the first node shard, on ``--streams`` streams at once, each sending its
next request as soon as the previous one is answered (``busy`` answers included: a flooder does
not back off). The frame is encoded once, so the flooder spends its time on the network, not on
building requests. At the end it prints one JSON object: requests sent, answers by kind (``ok``,
``busy`` by reason, other error codes), streams refused and the seconds it ran.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import multiaddr
import trio

from crypto.identity import Identity
from models import Pipeline
from protocols import INFER
from protocols.transport import close_quietly, connect, make_host, peer_info, quiet_libraries
from protocols.wire import WIRE_VERSION, encode_frame, encode_tensors, read_frame

TEXTS = ["A flood of requests, all of them valid.", "Fair service means nobody starves."]


def request_frame(deployment: Path, texts: int) -> tuple[str, bytes]:
    """(shard CID, one encoded infer request for the deployment's first node shard)."""
    pipeline = Pipeline(deployment)
    if pipeline.tokenizer is None:
        raise SystemExit(f"flood: {deployment} has no tokenizer to build a request with")
    sentences = (TEXTS * texts)[:texts]
    tokens = pipeline.tokenizer(sentences)
    head = pipeline.manifest.head
    out = pipeline.run_local(head, {t.name: tokens[t.name] for t in head.inputs})
    shard = pipeline.manifest.node_shards[0]
    message = {"v": WIRE_VERSION, "id": secrets.token_hex(8), "shard": shard.cid,
               "inputs": encode_tensors({t.name: out[t.name] for t in shard.inputs})}
    return shard.cid, encode_frame(message)


async def flood(node: str, frame: bytes, streams: int, seconds: float) -> dict[str, Any]:
    answers: collections.Counter[str] = collections.Counter()
    sent = 0
    refused = 0
    info = peer_info(node)
    host = make_host(Identity.generate())
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        await connect(host, info, 10)
        deadline = trio.current_time() + seconds

        async def one_stream() -> None:
            nonlocal sent, refused
            while trio.current_time() < deadline:
                try:
                    stream = await host.new_stream(info.peer_id, [INFER])
                except Exception:
                    refused += 1
                    await trio.sleep(0.01)
                    continue
                try:
                    while trio.current_time() < deadline:
                        await stream.write(frame)
                        sent += 1
                        reply = await read_frame(stream)
                        if reply is None:
                            answers["closed"] += 1
                            break
                        error = reply.get("error")
                        if error is None:
                            answers["ok"] += 1
                        elif error.get("code") == "busy":
                            answers[f"busy:{error.get('reason')}"] += 1
                        else:
                            answers[f"error:{error.get('code')}"] += 1
                except Exception as exc:
                    answers[f"broken:{type(exc).__name__}"] += 1
                finally:
                    await close_quietly(stream)

        started = time.perf_counter()
        with trio.move_on_after(seconds + 30):
            async with trio.open_nursery() as nursery:
                for _ in range(streams):
                    nursery.start_soon(one_stream)
        elapsed = time.perf_counter() - started
        await host.close()
    return {"sent": sent, "answers": dict(sorted(answers.items())), "streams_refused": refused,
            "seconds": round(elapsed, 2), "streams": streams}


@contextlib.contextmanager
def flooding(node: str, deployment: Path, seconds: float, streams: int = 16,
             ramp: float = 2.0) -> Iterator[Callable[[], dict[str, Any]]]:
    """Run this script in its own process (so its own PeerID) against ``node``; enter once it
    has built its request and flooded for ``ramp`` seconds. ``finish()`` waits for the end and
    returns the JSON report (RuntimeError if the flooder failed). The process is stopped on the
    way out, whatever happens."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--node", node, "--deployment",
         str(deployment), "--streams", str(streams), "--seconds", str(seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish() -> dict[str, Any]:
        out, err = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"the flooder exited with {proc.returncode}: {err}")
        report: dict[str, Any] = json.loads(out)
        return report

    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the request is built: the flood starts now
            if line.startswith("flood: ready"):
                break
        time.sleep(ramp)  # let it reach full speed
        yield finish
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", required=True, metavar="MULTIADDR",
                        help="the node to flood (/ip4/.../tcp/.../p2p/<PeerID>)")
    parser.add_argument("--deployment", required=True, type=Path, metavar="DIR",
                        help="an encrypted deployment the node serves (its client head builds "
                             "the request)")
    parser.add_argument("--streams", type=int, default=16, help="streams at once (16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long (10)")
    parser.add_argument("--texts", type=int, default=2, help="sentences per request (2)")
    args = parser.parse_args(argv)
    quiet_libraries()
    _, frame = request_frame(args.deployment, args.texts)
    print("flood: ready", file=sys.stderr, flush=True)  # the request is built; flooding starts
    result = trio.run(flood, args.node, frame, args.streams, args.seconds)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
