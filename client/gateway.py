"""``veilnet gateway``: the OpenAI HTTP API on this machine, answered through the network
(registered as a veilnet command; the app is client/gateway_app.py, docs/gateway.md).

The gateway holds each deployment's secret client shards, so prompts and embeddings are in the
clear only in this process: nodes see what they see for any other veilnet client. It binds
127.0.0.1 by default and refuses any other address unless ``--api-key-file`` names a key every
request must send as ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import stat
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from client.cli_options import client_options
from errors import InputError
from protocols.http_address import hypercorn_bind, split_host_port

DEFAULT_LISTEN = "127.0.0.1:8088"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) as ``(host, port)``; raises InputError."""
    parsed = split_host_port(value)
    if parsed is None:
        raise InputError(f"--listen {value!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return parsed


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: Path) -> str:
    """The bearer key in ``path`` (one line); the file must be private (mode 0600 or less)."""
    try:
        mode = path.stat().st_mode
        key = path.read_text().strip()
    except OSError as exc:
        raise InputError(f"--api-key-file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError(f"--api-key-file {path}: readable by others (mode "
                         f"{stat.S_IMODE(mode):o}); chmod 600 it")
    if len(key) < 16 or any(c.isspace() for c in key):
        raise InputError(f"--api-key-file {path}: the key must be one line of at least 16 "
                         "characters, no spaces")
    return key


def parse_deployment(value: str) -> tuple[str | None, Path]:
    """``[ID=]DIR``: the model id clients use (default: the model's name) and the directory."""
    name, sep, path = value.partition("=")
    if sep and name and "/" not in name and not Path(value).exists():
        return name, Path(path)
    return None, Path(value)


async def serve(args: argparse.Namespace) -> int:
    import hypercorn.trio
    import trio
    from hypercorn.config import Config
    from tokenizers import Tokenizer

    from client.async_client import AsyncClient
    from client.gateway_app import GatewayModel, create_gateway_app
    from models.manifest import Manifest

    host, port = parse_listen(args.listen)
    key = read_api_key(args.api_key_file) if args.api_key_file else None
    if key is None and not is_loopback(host):
        raise InputError(f"--listen {args.listen}: a non-loopback address needs "
                         "--api-key-file (anyone who reaches the port could use your "
                         "deployments' keys through it)")
    specs = []
    for value in args.deployment:
        name, path = parse_deployment(value)
        manifest = Manifest.load(path)
        specs.append((name or manifest.name, path, manifest))
    ids = [s[0] for s in specs]
    if len(set(ids)) != len(ids):
        raise InputError(f"two deployments share a model id ({', '.join(ids)}): name them "
                         "with --deployment ID=DIR")
    async with AsyncExitStack() as stack:
        models: dict[str, GatewayModel] = {}
        for model_id, path, manifest in specs:
            print(f"veilnet gateway: opening {model_id} ({manifest.name}, {manifest.encryption}"
                  f") ...", file=sys.stderr, flush=True)
            client = await stack.enter_async_context(
                AsyncClient(args.bootstrap, path, **client_options(args)))
            tok = Tokenizer.from_file(str(path / "client" / "tokenizer.json"))
            models[model_id] = GatewayModel(
                model_id, manifest, client, lambda t, tok=tok: len(tok.encode(t).ids),
                created=int(time.time()))
        app = create_gateway_app(models, key)
        config = Config()
        config.bind = [hypercorn_bind(host, port)]
        config.accesslog = None
        config.graceful_timeout = 2
        config.loglevel = "WARNING"
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                binds = await nursery.start(lambda task_status: hypercorn.trio.serve(
                    app, config, shutdown_trigger=shutdown.wait, task_status=task_status))
                url = binds[0] if binds else f"http://{args.listen}"
                print(f"veilnet gateway: serving {url}/v1 (models: {', '.join(models)}; "
                      f"{'API key required' if key else 'no API key: loopback only'})",
                      flush=True)
                async for _ in signals:
                    print("veilnet gateway: stopping", file=sys.stderr, flush=True)
                    shutdown.set()
                    break
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    import trio

    from protocols.transport import quiet_libraries

    quiet_libraries()
    logging.getLogger("veilnet.client").setLevel(logging.ERROR)
    if os.environ.get("VEILNET_GATEWAY_DEBUG"):
        logging.basicConfig(level=logging.INFO)
    return trio.run(serve, args)


def register(sub: Any) -> None:
    """Add ``veilnet gateway`` to the veilnet command line."""
    from client.cli_options import add_network_options

    parser: argparse.ArgumentParser = sub.add_parser(
        "gateway", help="serve the OpenAI HTTP API on this machine, answered through the network",
        description="An OpenAI-compatible HTTP API (/v1/models, /v1/embeddings, "
                    "/v1/chat/completions, /v1/completions) on this machine. It holds each "
                    "deployment's secret client shards: prompts are in the clear only in this "
                    "process. Point any OpenAI client at http://HOST:PORT/v1. Stop it with "
                    "Ctrl-C. docs/gateway.md has the routes, the extra 'veilnet' field and the "
                    "errors.")
    add_network_options(parser, "request", multi=True)
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"address to serve on (default {DEFAULT_LISTEN}; port 0 picks "
                             "one and prints it). A non-loopback address needs --api-key-file")
    parser.add_argument("--api-key-file", type=Path, metavar="FILE",
                        help="a file (mode 0600) holding the key clients must send as "
                             "'Authorization: Bearer <key>' (the openai package's api_key)")
    parser.set_defaults(func=_cmd_gateway)


__all__ = ["DEFAULT_LISTEN", "is_loopback", "parse_deployment", "parse_listen",
           "read_api_key", "register", "serve"]
