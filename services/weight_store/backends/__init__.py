"""Byte storage for weight versions. The server keeps the catalog (versions, readers, leases,
retention); a backend only allocates, seals, reads and frees byte buffers."""

from __future__ import annotations

from forgerpc.services.weight_store.backends.base import Backend, Blob, Pieces


def make_backend(cfg) -> Backend:
    """The backend named by `cfg.backend` (imports only the one chosen)."""
    if cfg.backend == "shm":
        from forgerpc.services.weight_store.backends.shm import SharedMemoryBackend
        return SharedMemoryBackend(cfg.shm_prefix, cfg.spare_segments, cfg.verify_threads)
    if cfg.backend == "memory":
        from forgerpc.services.weight_store.backends.memory import MemoryBackend
        return MemoryBackend()
    from forgerpc.services.weight_store.backends.torchstore import TorchStoreBackend
    return TorchStoreBackend()


__all__ = ["Backend", "Blob", "Pieces", "make_backend"]
