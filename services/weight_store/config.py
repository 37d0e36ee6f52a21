"""Weight store config: storage backend, retention, chunking, shared memory and lease timeouts.

    forgerpc serve weight_store backend=shm retain_versions=3 chunk_bytes=4194304
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forgerpc.services.common.runtime import ServiceConfig


class WeightStoreConfig(ServiceConfig):
    # shm: versions live in /dev/shm segments, so same-host readers map them (no copy in the
    # store; a version Put over gRPC stays as received until its first same-host reader);
    # memory: heap only, gRPC transport only; torchstore: see backends/torchstore.py.
    backend: Literal["shm", "memory", "torchstore"] = "shm"
    # Keep the newest K complete versions; older ones go once no reader holds them.
    retain_versions: int = Field(default=3, ge=1)
    # Default GetWeights chunk: 1-4 MiB keeps gRPC near its loopback peak (see bench/weight_sync.py).
    chunk_bytes: int = Field(default=4 << 20, ge=64 << 10, le=64 << 20)
    # Largest version accepted, in bytes (a 1.7B bf16 model is 3.4 GB).
    max_version_bytes: int = Field(default=64 << 30, gt=0)
    # Segment names start with "<shm_prefix>.<pid>."; a new store deletes those of dead pids.
    shm_prefix: str = Field(default="forgerpc-ws", pattern=r"^[A-Za-z0-9_-]{1,40}$")
    # Freed segments kept for reuse by the next upload of the same size (0 = always unlink).
    spare_segments: int = Field(default=2, ge=0, le=16)
    # A lease or an upload not released/committed within this time is reclaimed (crashed client).
    lease_ttl_seconds: float = Field(default=300.0, gt=0)
    upload_ttl_seconds: float = Field(default=600.0, gt=0)
    # Threads that verify checksums of shared-memory uploads (xxh3 releases the GIL) and that
    # allocate the pages of a new segment.
    verify_threads: int = Field(default=2, ge=1, le=64)
