"""Sandbox service config: worker pool, isolation tier and per-run limits.

    forgerpc serve sandbox --port 50061 workers=4 isolation=bwrap
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forgerpc.services.common.runtime import ServiceConfig

MiB = 1024 * 1024


class SandboxConfig(ServiceConfig):
    # Concurrency: `workers` runs at once; up to `max_queue` more wait; beyond that
    # RESOURCE_EXHAUSTED, so a flood of requests cannot pile up unbounded work.
    workers: int = Field(default=2, gt=0, le=256)
    max_queue: int = Field(default=256, ge=0)

    # auto = the strongest tier this host supports (bwrap > unshare > none). Naming a tier makes
    # start-up fail if the host cannot provide it, instead of silently running with less.
    isolation: Literal["auto", "bwrap", "unshare", "none"] = "auto"
    # Interpreter for LANGUAGE_PYTHON; "" = the interpreter serving this service (its real file,
    # not a venv shim, so the sandbox never sees the venv's packages or the repository).
    python: str = ""
    # Import the interpreter's site-packages. Off by default: programs get the standard library
    # only (-S), start several times faster, and no .pth hook of the host runs in the sandbox.
    site_packages: bool = False
    # Parent of this server's own directory WORK_ROOT/forgerpc-sandbox-<pid>, where fresh per-run
    # work directories are made and which is deleted on close; "" = $TMPDIR.
    work_root: str = ""
    # Run k executes as uid/gid uid_base + k (k < workers): one uid per concurrent slot, so the
    # process rlimit is per run and "kill every process of this uid" cleans up exactly one run.
    uid_base: int = Field(default=61000, gt=1000)

    # Limits. A request may ask for less time or memory than the max, never more.
    default_timeout_seconds: float = Field(default=5.0, gt=0)
    max_timeout_seconds: float = Field(default=60.0, gt=0)
    default_memory_bytes: int = Field(default=512 * MiB, gt=16 * MiB)
    max_memory_bytes: int = Field(default=4096 * MiB, gt=16 * MiB)
    max_processes: int = Field(default=32, gt=0)  # RLIMIT_NPROC, counts threads too
    max_file_bytes: int = Field(default=16 * MiB, gt=0)  # RLIMIT_FSIZE, per file written
    max_open_files: int = Field(default=64, ge=16)  # RLIMIT_NOFILE
    max_output_bytes: int = Field(default=1 * MiB, gt=0)  # per stream (stdout, stderr)
    max_input_bytes: int = Field(default=16 * MiB, gt=0)  # code + stdin + files
    tmp_bytes: int = Field(default=32 * MiB, gt=0)  # size of the private /tmp (bwrap tier)
