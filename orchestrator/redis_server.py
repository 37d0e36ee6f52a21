"""A private, throwaway redis-server for the embedded stack (no Redis URL in the config).

    with PrivateRedis() as url:     # redis://127.0.0.1:<free port>/0, temp dir, no persistence
        ...
    # stopped, temp dir removed

    with PrivateRedis(data_dir=RUN_DIR / "redis"):   # append-only file kept in the run directory:
        ...                                          # a resumed run restarts from the same data
"""

from __future__ import annotations

import pathlib
import shutil
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    def __init__(self, binary: str = "redis-server", data_dir: str | pathlib.Path | None = None):
        self.binary = shutil.which(binary)
        if self.binary is None:
            raise RuntimeError("redis-server not found on PATH: install it (Debian: apt-get install redis-server) "
                               "or set redis_url in the config")
        self.port = free_port()
        # With a data_dir, every write goes to an append-only file there (fsync once a second),
        # and the directory outlives the server; without one, nothing is persisted.
        self.persist = data_dir is not None
        if self.persist:
            pathlib.Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.dir = str(data_dir) if self.persist else tempfile.mkdtemp(prefix="forgerpc-redis-")
        self.process: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.process = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "yes" if self.persist else "no", "--appendfsync", "everysec",
             "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.process.stderr.read().decode()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self.url
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.persist:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
