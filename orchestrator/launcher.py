"""The local stack launcher: every service its own OS process on a free localhost port.

    async with Stack(cfg) as stack:        # starts, waits for SERVING
        stack.addresses["reward"]          # -> ["127.0.0.1:40123"]
    # leaving the block sends SIGTERM to every process (SIGKILL after 10 s)

Services given by `address` in the config are used as they are and never started or stopped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pathlib
import signal
import sys
import tempfile

import yaml

from forgerpc.clients import CLIENTS
from forgerpc.orchestrator.config import StackConfig

log = logging.getLogger("forgerpc.launcher")


@dataclasses.dataclass
class ServiceProcess:
    name: str
    index: int
    process: asyncio.subprocess.Process
    address: str = ""
    log_path: pathlib.Path | None = None


async def start_service(name: str, config: dict, index: int, log_dir: pathlib.Path,
                        timeout: float, cpus: tuple[int, ...] | list[int] = ()) -> ServiceProcess:
    """Spawns `python -m forgerpc.services serve NAME --port 0` (under `taskset -c CPUS` when given,
    so every thread it ever starts stays on those cores) and waits for its READY line."""
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = log_dir / f"{name}-{index}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = log_dir / f"{name}-{index}.log"
    stderr = open(log_path, "wb")
    pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
    process = await asyncio.create_subprocess_exec(
        *pin, sys.executable, "-m", "forgerpc.services", "serve", name, "--port", "0", "--config", str(config_path),
        stdout=asyncio.subprocess.PIPE, stderr=stderr, start_new_session=True,
    )
    stderr.close()
    service = ServiceProcess(name, index, process, log_path=log_path)
    try:
        line = await asyncio.wait_for(_ready_line(process), timeout)
    except (asyncio.TimeoutError, RuntimeError) as e:
        await stop_process(service)
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{name}[{index}] did not start ({e or 'timeout'}); log {log_path}:\n{tail}") from None
    service.address = line.split()[2]
    return service


async def _ready_line(process: asyncio.subprocess.Process) -> str:
    while True:
        raw = await process.stdout.readline()
        if not raw:
            raise RuntimeError(f"exited with code {await process.wait()}")
        line = raw.decode(errors="replace").strip()
        if line.startswith("FORGERPC_READY "):
            return line


async def stop_process(service: ServiceProcess, grace: float = 10.0) -> None:
    process = service.process
    if process.returncode is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(process.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("%s[%d] ignored SIGTERM for %.0fs; killing", service.name, service.index, grace)
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


class Stack:
    """Starts what the config asks for, exposes every service's addresses, stops what it started."""

    def __init__(self, cfg: StackConfig, log_dir: pathlib.Path | None = None):
        self.cfg = cfg
        self.log_dir = log_dir or pathlib.Path(tempfile.mkdtemp(prefix="forgerpc-stack-"))
        self.processes: list[ServiceProcess] = []
        self.addresses: dict[str, list[str]] = {}

    async def start(self) -> None:
        starts = []
        for name, entry in self.cfg.services.items():
            if entry.addresses():
                self.addresses[name] = entry.addresses()
                continue
            for i in range(entry.replicas):
                starts.append(start_service(name, entry.config, i, self.log_dir, self.cfg.start_timeout_seconds,
                                            entry.cpus))
        results = await asyncio.gather(*starts, return_exceptions=True)
        self.processes = [r for r in results if isinstance(r, ServiceProcess)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            raise errors[0]
        for p in sorted(self.processes, key=lambda p: (p.name, p.index)):
            self.addresses.setdefault(p.name, []).append(p.address)
        await self.wait_healthy()

    async def wait_healthy(self) -> None:
        async def ready(name: str, address: str):
            async with CLIENTS[name](address, settings=self.cfg.client.settings()) as client:
                await client.wait_ready(self.cfg.start_timeout_seconds)

        await asyncio.gather(*(ready(n, a) for n, addrs in self.addresses.items() for a in addrs))

    async def health(self) -> dict[str, list[tuple[str, str]]]:
        """{service: [(address, status), ...]} by grpc.health.v1."""
        async def one(name: str, address: str) -> str:
            async with CLIENTS[name](address, settings=self.cfg.client.settings()) as client:
                try:
                    return await client.health()
                except Exception as e:  # noqa: BLE001 - reported, not raised
                    return f"DOWN ({getattr(e, 'code', e)})"

        report = {}
        for name, addrs in self.addresses.items():
            report[name] = list(zip(addrs, await asyncio.gather(*(one(name, a) for a in addrs))))
        return report

    async def stop(self) -> None:
        await asyncio.gather(*(stop_process(p) for p in self.processes))
        self.processes = []

    async def __aenter__(self) -> "Stack":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
