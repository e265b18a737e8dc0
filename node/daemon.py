"""``veilnet node start``: one trio process running the libp2p host, the HTTP API and the shard
executor, until SIGINT or SIGTERM.

When it is ready it writes D/node.json (PeerID, did, multiaddrs, HTTP URL, pid) and prints the same
facts; it removes node.json when it stops. Scripts wait for that file to know the node is up.

On first start it also creates D/api-token (mode 0600): the bearer token the operator's HTTP
calls that change the node (POST /v1/shards/fetch) must carry. Before it says it is ready the node
loads a session for every stored shard, checking each file against its CID; a corrupt shard is
logged at ERROR and left unserved, and the node starts without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig

from crypto.identity import Identity
from ledger.log import Log
from ledger.witness import Witness
from node.byzantine import Byzantine
from node.config import ConfigError, NodeConfig
from node.discovery import Discovery
from node.executor import ShardExecutor
from node.http_api import create_app
from node.ledger_service import LedgerService
from node.rankings_service import RankingService
from node.recorder import ReceivedRecorder
from node.service import NodeService
from node.store import ShardStore
from protocols.http_address import hypercorn_bind
from protocols.transport import make_host, parse_multiaddr, quiet_libraries
from protocols.wire import WireError
from registry.index import CardIndex

log = logging.getLogger("veilnet.node")
READY_FILE = "node.json"
IDENTITY_FILE = "identity.key"
CARDS_FILE = "cards.sqlite"
WITNESS_FILE = "witness.sqlite"
LEDGER_DIR = "ledger"
API_TOKEN_FILE = "api-token"
MIN_TOKEN_LENGTH = 16


def open_data_dir(data_dir: Path) -> tuple[Identity, bool]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return Identity.load_or_create(data_dir / IDENTITY_FILE)


def load_or_create_api_token(data_dir: Path) -> tuple[str, bool]:
    """The operator's API token in D/api-token, created (random, 0600) if missing.

    Returns (token, created). Refuses a file others can read, and one holding fewer than
    MIN_TOKEN_LENGTH printable characters (an operator may write their own)."""
    path = data_dir / API_TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_api_token(path), False
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token, True


def _read_api_token(path: Path) -> str:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{path}: mode {mode:o} lets others read the API token; run chmod 600 "
                          "on it")
    token = path.read_text(encoding="utf-8", errors="replace").strip()
    if len(token) < MIN_TOKEN_LENGTH or not token.isascii() or not token.isprintable():
        raise ConfigError(f"{path}: the API token must be at least {MIN_TOKEN_LENGTH} printable "
                          "ASCII characters; delete the file to get a new one")
    return token


async def run_node(config: NodeConfig) -> None:
    assert config.data_dir is not None
    data_dir = config.data_dir
    identity, created = open_data_dir(data_dir)
    api_token, _ = load_or_create_api_token(data_dir)
    store = ShardStore(data_dir, config.shard_size_limit)
    executor = ShardExecutor(store, config.capacity, config.threads or None)
    service = NodeService(identity, store, executor, frame_limit=config.frame_limit,
                          request_timeout=config.request_timeout,
                          idle_timeout=config.idle_timeout,
                          peer_ttl=max(45.0, 4 * config.announce_interval),
                          sessions=config.session_limits())
    index = CardIndex(data_dir / CARDS_FILE)
    service.discovery = Discovery(identity.peer_id, index, service.metrics, service.build_card,
                                  config.announce_interval, card_rate=config.card_rate)

    def shard_corrupt(cid: str) -> None:  # the executor has logged it and the store dropped it
        service.metrics.corrupt_shards.inc()
        if service.discovery is not None:
            service.discovery.announce_soon()  # the card no longer names it

    executor.on_corrupt = shard_corrupt
    witness = Witness(data_dir / WITNESS_FILE, identity, f"veilnet-witness/{identity.peer_id}")
    ledger = (Log.open_or_init(data_dir / LEDGER_DIR, f"veilnet.local/ledger/{identity.peer_id}",
                               Identity.generate()) if config.ledger else None)
    if config.byzantine_test_mode:
        service.byzantine = Byzantine(config.byzantine_test_mode)
        service.sessions.byzantine = service.byzantine
        log.warning("BYZANTINE TEST MODE %r: this node returns wrong answers on purpose",
                    config.byzantine_test_mode)
    if config.record_received is not None:
        log.warning("RECORDING RECEIVED TENSORS (--record-received, an audit flag): every "
                    "input clients send to this node is written to %s (at most %d MB)",
                    config.record_received, config.record_max_mb)
        service.set_recorder(ReceivedRecorder(config.record_received,
                                              config.record_max_mb << 20))
    service.ledger = LedgerService(identity.peer_id, witness, service.metrics, service.discovery,
                                   ledger)
    service.rankings = RankingService(identity, service.ledger, service.discovery,
                                      config.announce_interval)
    service.ledger.rankings_entry = lambda: service.rankings.entry if service.rankings else None
    listen = [parse_multiaddr(a) for a in config.listen]
    host_name, port = config.http_host_port()
    hconfig = HypercornConfig()
    hconfig.bind = [hypercorn_bind(host_name, port)]
    hconfig.graceful_timeout = 2
    hconfig.accesslog = None
    # Hypercorn's own "Running on" line would repeat the banner's http URL
    hconfig.loglevel = "DEBUG" if config.log_level.lower() == "debug" else "WARNING"
    shutdown, http_done = trio.Event(), trio.Event()
    app = create_app(service, domain=config.domain, api_token=api_token)

    async def serve_http(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
                         ) -> None:
        try:
            await hypercorn.trio.serve(app, hconfig, shutdown_trigger=shutdown.wait,
                                       task_status=task_status)
        finally:
            http_done.set()

    ready_file = data_dir / READY_FILE

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        host = make_host(identity)
        try:
            async with host.run(listen_addrs=listen), trio.open_nursery() as nursery:
                service.attach(host)
                binds = await nursery.start(serve_http)
                service.http_url = binds[0] if binds else None
                for cid in sorted(store.shards()):  # load sessions before saying "ready"
                    try:
                        await executor.session(cid)
                    except WireError as exc:  # a corrupt file: logged, counted, not served
                        if exc.code != "corrupt_shard":
                            raise
                await nursery.start(service.discovery.run, host)
                await nursery.start(service.ledger.run)
                nursery.start_soon(service.sessions.expire_loop)
                service.rankings.host = host
                nursery.start_soon(service.rankings.run)
                if config.bootstrap:
                    nursery.start_soon(service.announce_loop, config.bootstrap,
                                       config.announce_interval)
                info = {
                    "pid": os.getpid(), "peer_id": identity.peer_id, "did": identity.did,
                    "multiaddrs": service.addrs(), "http": service.http_url,
                    "shards": sorted(store.shards()), "identity_created": created,
                    "byzantine": config.byzantine_test_mode,
                    "record_received": str(config.record_received)
                    if config.record_received is not None else None,
                }
                _write_ready(ready_file, info)
                _print_banner(info, data_dir)
                async for signum in signals:
                    log.info("received %s, stopping", signal.Signals(signum).name)
                    break
                shutdown.set()
                with trio.move_on_after(3):
                    await http_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            ready_file.unlink(missing_ok=True)
            index.close()
            witness.close()
            if ledger is not None:
                ledger.close()
            with trio.move_on_after(2) as scope, contextlib.suppress(Exception):
                scope.shield = True
                await host.close()
    print("veilnet: node stopped", flush=True)


def _write_ready(path: Path, info: dict[str, object]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


def _print_banner(info: dict[str, object], data_dir: Path) -> None:
    lines = [
        f"veilnet: node {'created' if info['identity_created'] else 'loaded'} identity "
        f"{data_dir / IDENTITY_FILE}",
        f"  peer id:   {info['peer_id']}",
        f"  did:       {info['did']}",
        *[f"  listen:    {a}" for a in info["multiaddrs"]],  # type: ignore[attr-defined]
        f"  http:      {info['http']}",
        f"  api token: {data_dir / API_TOKEN_FILE} (Authorization: Bearer, for "
        "POST /v1/shards/fetch)",
        f"  shards:    {len(info['shards'])}",  # type: ignore[arg-type]
        *([f"  BYZANTINE TEST MODE: {info['byzantine']} (wrong answers on purpose)"]
          if info.get("byzantine") else []),
        *([f"  RECORDING RECEIVED TENSORS to {info['record_received']} (--record-received)"]
          if info.get("record_received") else []),
        "  stop with Ctrl-C (SIGINT) or SIGTERM",
    ]
    print("\n".join(lines), flush=True)


def start(config: NodeConfig) -> int:
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries(debug=config.log_level.lower() == "debug")
    trio.run(run_node, config)
    return 0
