"""The SandboxService servicer: validates requests, bounds concurrency, runs code in isolation.

Each admitted request takes a slot k (0 <= k < workers) and runs as uid `uid_base + k` on a
worker thread; at most `max_queue` more wait for a slot, and beyond that the call fails fast
with RESOURCE_EXHAUSTED (reason SANDBOX_BUSY) so that callers can back off.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import math
import os
import posixpath
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

from forgerpc.clients.config import ConfigError
from forgerpc.services.common.errors import require, resource_exhausted
from forgerpc.services.common.runtime import ServiceDefinition
from forgerpc.services.sandbox import executor
from forgerpc.services.sandbox.config import SandboxConfig
from forgerpc.services.sandbox.isolation import Isolation, Limits, default_python, detect
from forgerpc.v1 import sandbox_pb2, sandbox_pb2_grpc

log = logging.getLogger("forgerpc.sandbox")


def _check_path(path: str, field: str) -> None:
    require(bool(path), field, "must not be empty")
    require("\x00" not in path and "\\" not in path, field, "must not contain NUL or backslash")
    require(not path.startswith("/"), field, "must be relative to the work directory")
    parts = path.split("/")
    require(".." not in parts and "." not in parts and "" not in parts, field,
            "must be a normalized relative path without '..', '.' or empty parts")
    require(len(parts) <= 16 and len(path) <= 4096, field, "is too deep or too long")
    require(posixpath.normpath(path) != executor.MAIN, field, f"'{executor.MAIN}' holds the code")


class SandboxServicer(sandbox_pb2_grpc.SandboxServiceServicer):
    def __init__(self, cfg: SandboxConfig, iso: Isolation, work_root: str):
        self.cfg = cfg
        self.iso = iso
        self.work_root = work_root
        self.pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="sandbox")
        self.free = asyncio.Queue()
        for slot in range(cfg.workers):
            self.free.put_nowait(slot)
        self.waiting = 0
        self.cgroups = _slot_cgroups(cfg.workers)
        self.layers = list(iso.layers) + (["cgroup_accounting"] if self.cgroups else [])

    def _limits(self, request: sandbox_pb2.ExecuteRequest) -> tuple[float, Limits]:
        cfg = self.cfg
        require(math.isfinite(request.timeout_seconds) and request.timeout_seconds >= 0,
                "timeout_seconds", "must be a finite number >= 0 (0 = server default)")
        require(request.timeout_seconds <= cfg.max_timeout_seconds, "timeout_seconds",
                f"at most {cfg.max_timeout_seconds:g} on this server")
        require(request.memory_bytes <= cfg.max_memory_bytes, "memory_bytes",
                f"at most {cfg.max_memory_bytes} on this server")
        require(request.memory_bytes == 0 or request.memory_bytes >= 32 * 1024 * 1024,
                "memory_bytes", "at least 32 MiB (an interpreter needs that much address space)")
        timeout = request.timeout_seconds or cfg.default_timeout_seconds
        limits = Limits(
            # CPU limit a little above the wall limit: the wall clock is the primary bound, the
            # CPU limit catches what escapes the group kill.
            cpu_seconds=math.ceil(timeout) + 1,
            memory_bytes=request.memory_bytes or cfg.default_memory_bytes,
            processes=cfg.max_processes, file_bytes=cfg.max_file_bytes,
            open_files=cfg.max_open_files, tmp_bytes=cfg.tmp_bytes,
        )
        return timeout, limits

    def _validate(self, request: sandbox_pb2.ExecuteRequest):
        require(request.language in (sandbox_pb2.LANGUAGE_UNSPECIFIED, sandbox_pb2.LANGUAGE_PYTHON),
                "language", "only LANGUAGE_PYTHON is supported")
        require(bool(request.code.strip()), "code", "must not be empty")
        size = len(request.code.encode()) + len(request.stdin)
        seen = set()
        for i, f in enumerate(request.files):
            _check_path(f.path, f"files[{i}].path")
            require(f.path not in seen, f"files[{i}].path", "duplicate path")
            seen.add(f.path)
            size += len(f.content)
        require(size <= self.cfg.max_input_bytes, "files",
                f"code + stdin + files hold {size} bytes, at most {self.cfg.max_input_bytes}")
        # A file may not also be a parent directory of another file.
        for p in seen:
            parts = p.split("/")
            require(not any("/".join(parts[:k]) in seen for k in range(1, len(parts))),
                    "files", f"'{p}' lies under a path that is also a file")
        return self._limits(request)

    async def Execute(self, request: sandbox_pb2.ExecuteRequest, context) -> sandbox_pb2.ExecuteResponse:
        timeout, limits = self._validate(request)
        if self.free.empty() and self.waiting >= self.cfg.max_queue:
            raise resource_exhausted(
                "SANDBOX_BUSY",
                f"all {self.cfg.workers} workers busy and {self.waiting} requests queued; retry later",
                workers=str(self.cfg.workers), queued=str(self.waiting))
        self.waiting += 1
        try:
            slot = await self.free.get()
        finally:
            self.waiting -= 1
        try:
            run = asyncio.get_running_loop().run_in_executor(
                self.pool, executor.execute, self.iso, self.work_root, self.cfg.uid_base + slot,
                request.code, bytes(request.stdin), [(f.path, bytes(f.content)) for f in request.files],
                timeout, limits, self.cfg.max_output_bytes,
                self.cgroups[slot] if self.cgroups else None, self.cfg.site_packages,
            )
        except BaseException:
            self.free.put_nowait(slot)
            raise
        # The slot (its uid and cgroup) is free only when the run has really ended: a caller that
        # cancels must not let a second run share the uid of one still going.
        run.add_done_callback(lambda _: self.free.put_nowait(slot))
        out = await asyncio.shield(run)
        return sandbox_pb2.ExecuteResponse(
            verdict=out.verdict, exit_code=out.exit_code, stdout=out.stdout, stderr=out.stderr,
            wall_seconds=out.wall_seconds, cpu_seconds=out.cpu_seconds,
            peak_memory_bytes=out.peak_memory_bytes, isolation_layers=self.layers,
        )

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for cg in self.cgroups:
            cg.remove()
        shutil.rmtree(self.work_root, ignore_errors=True)


def _slot_cgroups(n: int) -> list[executor.SlotCgroup]:
    """One memory/cpuacct cgroup per slot for peak-memory accounting, or [] where the host refuses."""
    if not executor.SlotCgroup.available():
        log.warning("sandbox: no writable memory/cpuacct cgroups; peak memory and CPU time from wait4 (approximate)")
        return []
    _remove_stale_cgroups()
    try:
        groups = [executor.SlotCgroup(f"forgerpc-sandbox-{os.getpid()}-{k}") for k in range(n)]
        with groups[0].spawning():
            probe = subprocess.Popen(["sleep", "5"])
        try:
            with open(f"/proc/{probe.pid}/cgroup") as f:
                if groups[0].mem.rsplit("/", 1)[1] not in f.read():
                    raise OSError("a spawned child did not land in its slot cgroup")
        finally:
            probe.kill()
            probe.wait()
        groups[0].peak()
        return groups
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("sandbox: memory/cpuacct cgroup unusable (%s); peak memory is wait4's upper bound", e)
        return []


def _remove_stale_cgroups() -> None:
    """Removes the empty slot cgroups of sandbox servers that died without closing."""
    for controller in ("memory", "cpuacct"):
        root = os.path.join(executor.SlotCgroup.ROOT, controller)
        for name in os.listdir(root):
            parts = name.split("-")
            if name.startswith("forgerpc-sandbox-") and len(parts) == 4 and parts[2].isdigit():
                if not os.path.exists(f"/proc/{parts[2]}"):
                    try:
                        os.rmdir(os.path.join(root, name))
                    except OSError:
                        pass


_servicers: list[SandboxServicer] = []


async def create(cfg: SandboxConfig):
    # The server works in a directory of its own under work_root ($TMPDIR by default) and deletes
    # only that one on close: work_root itself may be shared (e.g. /tmp) and is never removed.
    parent = cfg.work_root or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(os.path.join(parent, "forgerpc-sandbox-*")):  # of servers that died unclosed
        pid = stale.rsplit("-", 1)[1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(stale, ignore_errors=True)
    # Parents of each run dir must be traversable by the run's uid (x, not r); the run dir itself is 0700.
    mode = os.stat(parent).st_mode
    if mode & 0o011 != 0o011:
        os.chmod(parent, mode | 0o011)
    work_root = os.path.join(parent, f"forgerpc-sandbox-{os.getpid()}")
    os.makedirs(work_root, exist_ok=True)
    os.chmod(work_root, 0o711)
    python = cfg.python or default_python()
    try:
        iso = await asyncio.to_thread(detect, cfg.isolation, python, work_root)
    except RuntimeError as e:
        raise ConfigError(f"key 'isolation': {e}") from None
    servicer = SandboxServicer(cfg, iso, work_root)
    _servicers.append(servicer)
    return [servicer]


async def close():
    while _servicers:
        await asyncio.to_thread(_servicers.pop().close)


SERVICE = ServiceDefinition(name="sandbox", config_model=SandboxConfig, create=create, close=close)
