"""TorchStore backend (the `[torchstore]` extra): versions live in a TorchStore as uint8 tensors.

Written against TorchStore's documented API (`import torchstore as ts`; `await ts.initialize()`,
`await ts.put(key, tensor)`, `await ts.get(key)`, `await ts.delete(key)`, `await ts.shutdown()`),
so that trainers using TorchStore natively (DTensor resharding, RDMA) and gRPC readers of this
service see the same versions under keys "forgerpc/weights/v<N>".

NOT exercised in CI: PyPI's torchstore 0.1.2 pins torch 2.9.0 and torchmonarch 0.1.2 (which
needs libcuda), and against torchmonarch 0.7.0 `initialize()` fails ("Controller mixes both async
and sync endpoints"); see ENVIRONMENT.md. The conformance tests run against it whenever
`import torchstore` and `initialize()` succeed, and skip with that reason otherwise.
"""

from __future__ import annotations

from forgerpc.services.weight_store.backends.base import Pieces
from forgerpc.services.weight_store.backends.memory import HeapBlob

KEY = "forgerpc/weights/v{}"


class TorchStoreBlob(HeapBlob):
    """A sealed version: the bytes are in TorchStore; `view` is a local read copy, fetched lazily."""

    def __init__(self, key: str, size: int, owner: set, backend: "TorchStoreBackend"):
        super().__init__(0, owner)
        self.key, self.size, self._backend = key, size, backend
        self._local = None

    def free(self) -> None:
        super().free()
        self._local = None
        self._backend.doomed.append(self.key)  # deleted from TorchStore on the next await point


class TorchStoreBackend:
    shared_memory = False

    def __init__(self):
        try:
            import torchstore as ts  # the optional [torchstore] extra
        except ImportError as e:
            raise OSError(f"backend=torchstore needs the [torchstore] extra: {e}") from None
        self.ts = ts
        self._blobs: set = set()
        self.doomed: list[str] = []

    async def start(self) -> None:
        await self.ts.initialize()

    async def allocate(self, size: int, kind: str) -> HeapBlob:
        return HeapBlob(size, self._blobs)  # staging; bytes move into TorchStore on seal

    async def seal(self, key: str, blob: HeapBlob | Pieces) -> TorchStoreBlob:
        import torch
        await self._purge()
        name = KEY.format(key)
        flat = bytearray().join(blob.views) if isinstance(blob, Pieces) else blob.view
        await self.ts.put(name, torch.frombuffer(flat, dtype=torch.uint8).clone())
        size = blob.size
        blob.free()
        return TorchStoreBlob(name, size, self._blobs, self)

    async def readable(self, blob: TorchStoreBlob) -> Pieces:
        await self._purge()
        if blob._local is None:
            tensor = await self.ts.get(blob.key)
            blob._local = tensor.contiguous().numpy()
        return Pieces([memoryview(blob._local)])

    async def _purge(self) -> None:
        while self.doomed:
            await self.ts.delete(self.doomed.pop())

    async def close(self) -> None:
        for blob in list(self._blobs):
            blob.free()
        await self._purge()
        await self.ts.shutdown()
