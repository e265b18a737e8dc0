"""``Client``: the blocking facade over ``AsyncClient``, with the same arguments and methods.

A private thread runs a trio event loop holding the AsyncClient open; each call is handed to that
loop with ``trio.from_thread.run`` and blocks until it returns. Use it as a context manager (or
call ``close()``) so the libp2p host is shut down.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import trio

from client.async_client import AsyncClient, GenerationStream
from client.generation import TokenDelta
from client.receipts import LedgerReceipt
from client.results import EmbedResult, GenerateResult, HopRecord
from crypto.identity import Identity
from models import Manifest
from protocols.peers import PeerRecord
from protocols.transport import DIAL_TIMEOUT
from protocols.wire import DEFAULT_FRAME_LIMIT

T = TypeVar("T")


class Client:
    """``with Client(bootstrap, deployment) as client: client.embed(...)``; the arguments are
    ``AsyncClient``'s."""

    def __init__(self, bootstrap: Sequence[str], deployment: Path | str, *,
                 timeout: float = 120.0, hop_timeout: float = 30.0,
                 connect_timeout: float = DIAL_TIMEOUT,
                 threads: int | None = None, frame_limit: int = DEFAULT_FRAME_LIMIT,
                 identity: Identity | None = None, ledger: bool = True,
                 witness_quorum: int = 1, receipt_timeout: float = 15.0,
                 verify: str = "full", replicas: int = 3, spot_rate: float = 0.1,
                 seed: int | None = None, allow_unverified: bool = False) -> None:
        self.async_client = AsyncClient(
            bootstrap, deployment, timeout=timeout, hop_timeout=hop_timeout,
            connect_timeout=connect_timeout, threads=threads, frame_limit=frame_limit,
            identity=identity, ledger=ledger, witness_quorum=witness_quorum,
            receipt_timeout=receipt_timeout, verify=verify, replicas=replicas,
            spot_rate=spot_rate, seed=seed, allow_unverified=allow_unverified)
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,),
                                        name="veilnet-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    async def _main(self) -> None:
        try:
            async with self.async_client:
                self._token = trio.lowlevel.current_trio_token()
                self._stop = trio.Event()
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
            else:
                raise
        finally:
            self._ready.set()

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._token is None or not self._thread.is_alive():
            raise RuntimeError("the client is closed")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    @property
    def manifest(self) -> Manifest:
        return self.async_client.manifest

    def embed(self, texts: Sequence[str]) -> EmbedResult:
        return self._call(self.async_client.embed, texts)

    def run(self, inputs: Mapping[str, np.ndarray],
            ) -> tuple[dict[str, np.ndarray], list[HopRecord]]:
        return self._call(self.async_client.run, inputs)

    def run_ckks(self, inputs: Mapping[str, np.ndarray],
                 ) -> tuple[dict[str, np.ndarray], list[HopRecord]]:
        """``AsyncClient.run_ckks``: the node shard on CKKS ciphertexts."""
        return self._call(self.async_client.run_ckks, inputs)

    def generate(self, prompt: str | None = None, *,
                 messages: Sequence[Mapping[str, str]] | None = None, max_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] | str = ()) -> GenerateResult:
        """``AsyncClient.generate``."""
        return self._call(functools.partial(
            self.async_client.generate, prompt, messages=messages, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, seed=seed, stop=stop))

    def stream(self, prompt: str | None = None, *,
               messages: Sequence[Mapping[str, str]] | None = None, max_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: Sequence[str] | str = ()) -> SyncGenerationStream:
        """``AsyncClient.stream``, blocking: ``with client.stream("Hi") as s: for t in s:``."""
        return SyncGenerationStream(self, self.async_client.stream(
            prompt, messages=messages, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, seed=seed, stop=stop))

    def refresh(self) -> list[PeerRecord]:
        return self._call(self.async_client.refresh)

    def log_receipt(self, hops: Sequence[HopRecord]) -> LedgerReceipt:
        return self._call(self.async_client.log_receipt, hops)

    def log_generation(self, result: GenerateResult) -> LedgerReceipt:
        return self._call(self.async_client.log_generation, result)

    def publish_scores(self) -> int | None:
        return self._call(self.async_client.publish_scores)

    def close(self) -> None:
        if self._token is not None and self._thread.is_alive():
            stop = self._stop
            assert stop is not None
            trio.from_thread.run_sync(stop.set, trio_token=self._token)
            self._thread.join(timeout=10)
        self._token = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncGenerationStream:
    """A generation as an iterator of ``TokenDelta``; ``result`` once it ends. Use it in a
    ``with`` block so the node sessions are closed also when you stop early."""

    def __init__(self, client: Client, stream: GenerationStream) -> None:
        self._client, self._stream = client, stream
        self._entered = False

    @property
    def result(self) -> GenerateResult | None:
        return self._stream.result

    def holders(self) -> dict[int, list[str]]:
        """PeerIDs holding this generation's sessions now, per node shard index."""
        return self._stream.holders()

    def __enter__(self) -> SyncGenerationStream:
        self._client._call(self._stream.__aenter__)
        self._entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._entered:
            self._entered = False
            self._client._call(self._stream.__aexit__, None, None, None)

    def __iter__(self) -> Iterator[TokenDelta]:
        if not self._entered:
            raise RuntimeError("use the stream inside 'with'")
        while (token := self._client._call(self._stream.next)) is not None:
            yield token


__all__ = ["Client", "SyncGenerationStream"]
