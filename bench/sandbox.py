"""Sandbox overhead: executions/s of a trivial Python snippet, isolated vs a bare subprocess.

    .venv/bin/python bench/sandbox.py              # 60 runs of each, interleaved
    .venv/bin/python bench/sandbox.py --runs 200

Measured in this run, one execution at a time, same interpreter, same flags (the sandbox's
default `-E -s -B -S`), same snippet (`print(1)`):

    bare_per_s        = runs / t, subprocess.run([python, *flags, "-c", snippet], capture_output=True)
    isolated_per_s    = runs / t, the sandbox's own execute path: fresh work dir, cgroup join,
                        bwrap namespaces + seccomp, prlimit, setpriv, output pump, uid sweep,
                        cleanup (every layer the host supports; `layers` lists them)
    isolated_grpc_per_s = the same through a real `forgerpc serve sandbox` process over gRPC
    overhead_ratio    = bare_per_s / isolated_per_s        (target <= 2.0)
    isolated_cpu_ms, bare_cpu_ms = median CPU time per execution, all processes of each (the
                        isolated one from the run's cgroup): what the machine pays, whatever the load

The two in-process modes alternate run by run so that load drift on a shared machine hits both
alike; medians per execution (and their ratio) are reported beside the means. Needs root for the full set of layers. Results go to bench/results/sandbox.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from forgerpc.clients import SandboxClient
from forgerpc.services.sandbox import executor
from forgerpc.services.sandbox.config import SandboxConfig
from forgerpc.services.sandbox.isolation import Limits, default_python, detect
from forgerpc.services.sandbox.server import _slot_cgroups

ROOT = pathlib.Path(__file__).resolve().parents[1]
SNIPPET = "print(1)"


def bench_inprocess(runs: int) -> dict:
    cfg = SandboxConfig()
    work_root = tempfile.mkdtemp(prefix="forgerpc-bench-sandbox-")
    os.chmod(work_root, 0o711)
    python = default_python()
    iso = detect("auto", python, work_root)
    cgroups = _slot_cgroups(1)
    limits = Limits(cpu_seconds=6, memory_bytes=cfg.default_memory_bytes, processes=cfg.max_processes,
                    file_bytes=cfg.max_file_bytes, open_files=cfg.max_open_files, tmp_bytes=cfg.tmp_bytes)
    uid = cfg.uid_base + 900  # away from any running sandbox's slots

    cpu = {"isolated": [], "bare": []}

    def isolated():
        out = executor.execute(iso, work_root, uid, SNIPPET, b"", [], 5.0, limits,
                               cfg.max_output_bytes, cgroups[0] if cgroups else None)
        assert out.stdout == b"1\n", out
        cpu["isolated"].append(out.cpu_seconds)  # every process of the chain (cgroup)

    def bare():
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([python, *executor.python_flags(False), "-c", SNIPPET],
                             capture_output=True, timeout=10)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert out.stdout == b"1\n"
        cpu["bare"].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)

    for fn in (isolated, bare):  # warm page cache and the interpreter
        for _ in range(3):
            fn()
    times = {"isolated": [], "bare": []}
    for _ in range(runs):  # alternate one by one: load drift hits both alike
        for name, fn in (("isolated", isolated), ("bare", bare)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for cg in cgroups:
        cg.remove()
    os.rmdir(work_root)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"isolated_per_s": runs / sum(times["isolated"]), "bare_per_s": runs / sum(times["bare"]),
            "isolated_median_ms": med["isolated"] * 1e3, "bare_median_ms": med["bare"] * 1e3,
            "overhead_ratio_median": med["isolated"] / med["bare"],
            # CPU seconds per execution (less sensitive to load than wall time); isolated comes
            # from the slot cgroup, so it needs cgroup_accounting to mean anything.
            "isolated_cpu_ms": statistics.median(cpu["isolated"][3:]) * 1e3,
            "bare_cpu_ms": statistics.median(cpu["bare"][3:]) * 1e3,
            "tier": iso.tier, "layers": list(iso.layers) + (["cgroup_accounting"] if cgroups else [])}


async def bench_grpc(runs: int) -> float:
    proc = subprocess.Popen([sys.executable, "-m", "forgerpc.services", "serve", "sandbox", "--port", "0",
                             "workers=1", "uid_base=61950"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("FORGERPC_READY"), line
        async with SandboxClient(line.split()[2]) as client:
            for _ in range(3):
                await client.execute(code=SNIPPET)
            start = time.perf_counter()
            for _ in range(runs):
                out = await client.execute(code=SNIPPET)
                assert out.stdout == b"1\n"
            return runs / (time.perf_counter() - start)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    result = bench_inprocess(args.runs)
    result["isolated_grpc_per_s"] = asyncio.run(bench_grpc(args.runs))
    result["overhead_ratio"] = result["bare_per_s"] / result["isolated_per_s"]
    result |= {"runs": args.runs, "snippet": SNIPPET, "python": default_python(),
               "python_flags": executor.python_flags(False), "target_overhead_ratio": 2.0,
               "meets_target": result["overhead_ratio"] <= 2.0, "host": platform.node(),
               "cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = ROOT / "bench" / "results" / "sandbox.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for key in ("bare_per_s", "isolated_per_s", "isolated_grpc_per_s", "overhead_ratio",
                "overhead_ratio_median", "bare_cpu_ms", "isolated_cpu_ms"):
        print(f"{key:>20}: {result[key]:.2f}")
    print(f"{'tier':>20}: {result['tier']}  ->  {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
