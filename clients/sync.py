"""Blocking wrappers over the async clients, for scripts and notebooks.

    reward = SyncClient(RewardClient, "127.0.0.1:50051")
    reward.evaluate(items=[...])          # blocks; same retries, deadlines and errors

The async client lives on a private event loop in a daemon thread (grpc.aio channels are bound
to the loop that made them), so sync calls work from any thread, inside or outside asyncio.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="forgerpc-sync", daemon=True).start()
        return _loop


def _run(coro) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, _background_loop()).result()


class SyncClient:
    """Wraps any AsyncClient (or ReplicaGroup) class: every coroutine method becomes blocking and
    every async-iterator method becomes a plain iterator."""

    def __init__(self, client_cls: type, *args, **kwargs):
        async def make():
            return client_cls(*args, **kwargs)

        self._client = _run(make())

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if inspect.iscoroutinefunction(attr):
            return lambda *a, **k: _run(attr(*a, **k))
        if callable(attr) and name in ("get_weights", "watch_versions"):
            return lambda *a, **k: _iterate(attr(*a, **k))
        return attr

    def close(self) -> None:
        _run(self._client.close())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _iterate(agen):
    loop = _background_loop()
    while True:
        try:
            yield asyncio.run_coroutine_threadsafe(agen.__anext__(), loop).result()
        except StopAsyncIteration:
            return
