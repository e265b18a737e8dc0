"""``Client``: the blocking facade over ``AsyncClient``.

A private thread runs a trio event loop holding the AsyncClient open; each call is handed to that
loop with ``trio.from_thread.run`` and blocks until it returns. Use it as a context manager (or
call ``close()``) so the libp2p host is shut down.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import trio

from client.async_client import AsyncClient, EmbedResult, HopRecord


class Client:
    def __init__(self, bootstrap: Sequence[str], deployment: Path | str, **options: Any) -> None:
        self._async = AsyncClient(bootstrap, deployment, **options)
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
            async with self._async:
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

    def _call(self, fn: Any, *args: Any) -> Any:
        if self._token is None or not self._thread.is_alive():
            raise RuntimeError("the client is closed")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def embed(self, texts: Sequence[str]) -> EmbedResult:
        return self._call(self._async.embed, texts)

    def run(self, inputs: Mapping[str, np.ndarray],
            ) -> tuple[dict[str, np.ndarray], list[HopRecord]]:
        return self._call(self._async.run, inputs)

    def run_ckks(self, inputs: Mapping[str, np.ndarray],
                 ) -> tuple[dict[str, np.ndarray], list[HopRecord]]:
        """``AsyncClient.run_ckks``: the node shard on CKKS ciphertexts."""
        return self._call(self._async.run_ckks, inputs)

    def refresh(self) -> None:
        self._call(self._async.refresh)

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
