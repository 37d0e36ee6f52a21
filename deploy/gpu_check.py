"""GPU check of the compose `gpu` profile: its generator and trainer commands on a real GPU.

    python deploy/gpu_check.py build/gpu-compose.json OUT_DIR      (run by deploy/gpu_check.sh)

Takes the exact commands and environment compose renders for `generator-gpu-0` and
`trainer-gpu` (FORGERPC_DEVICE=cuda, FORGERPC_DTYPE=bfloat16, FORGERPC_TOKEN, ...), runs them as
processes (host 127.0.0.1, free port; the model is a tiny one made here), and checks: READY,
health SERVING, the process holds GPU memory, Generate without the token is UNAUTHENTICATED
and with it returns tokens. Writes OUT_DIR/gpu_check.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import select
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORGERPC = [sys.executable, "-m", "forgerpc.orchestrator"]


def start(service: dict, configs: dict, env: dict) -> tuple[subprocess.Popen, str]:
    target = {c["target"]: c["source"] for c in service["configs"]}
    command = [str(ROOT / "deploy" / "configs" / pathlib.Path(configs[target[a]]["file"]).name)
               if a in target else a for a in service["command"]]
    proc = subprocess.Popen([*FORGERPC, *command, "server.host=127.0.0.1", "server.port=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if line.startswith("FORGERPC_READY"):
                return proc, line.split()[2]
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise RuntimeError(f"{command} did not start: {proc.stderr.read()[-3000:]}")


def gpu_pids() -> set[int]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except FileNotFoundError:  # a CPU dry run of this script
        return set()
    print(out, flush=True)
    return {int(line.split(",")[0]) for line in out.splitlines() if line.strip()}


async def generate(address: str, token: bool) -> str | int:
    from forgerpc.clients import ChannelSettings, ForgeRPCError, GeneratorClient
    from forgerpc.clients.retry import NO_RETRY
    from forgerpc.v1 import common_pb2

    settings = ChannelSettings(token_env="FORGERPC_TOKEN" if token else "")
    async with GeneratorClient(address, settings=settings, retry=NO_RETRY, timeout=120) as g:
        try:
            out = await g.generate(prompts=[common_pb2.Prompt(text="1+2=")],
                                   sampling_params=common_pb2.SamplingParams(n=2, max_tokens=8, temperature=1.0))
        except ForgeRPCError as e:
            return e.code.name
        return sum(len(c.token_ids) for c in out.completions)


def main(rendered: str, out_dir: str) -> int:
    doc = json.loads(pathlib.Path(rendered).read_text())
    model = pathlib.Path(out_dir) / "tiny"
    subprocess.run([sys.executable, "-m", "forgerpc.services.common.models", "tiny", str(model), "--seed", "0"],
                   check=True, timeout=300)
    result: dict = {}
    procs = []
    try:
        for name in ("generator-gpu-0", "trainer-gpu"):
            service = doc["services"][name]
            env = {**service["environment"], "FORGERPC_MODEL": str(model)}
            t0 = time.monotonic()
            proc, address = start(service, doc["configs"], env)
            procs.append(proc)
            health = subprocess.run([*FORGERPC, "health", address], capture_output=True, text=True, timeout=60)
            result[name] = {"address": address, "start_seconds": round(time.monotonic() - t0, 1),
                            "health": health.stdout.strip(), "env": {k: v for k, v in env.items() if "TOKEN" not in k}}
        os.environ["FORGERPC_TOKEN"] = doc["services"]["generator-gpu-0"]["environment"]["FORGERPC_TOKEN"]
        address = result["generator-gpu-0"]["address"]
        result["generate_without_token"] = asyncio.run(generate(address, token=False))
        result["generate_tokens"] = asyncio.run(generate(address, token=True))
        pids = gpu_pids()
        for name, proc in zip(("generator-gpu-0", "trainer-gpu"), procs):
            result[name]["holds_gpu_memory"] = proc.pid in pids
    finally:
        for name, proc in zip(("generator-gpu-0", "trainer-gpu"), procs):
            proc.terminate()
            try:
                _, err = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            # The service's own log: what an INTERNAL answer was, on this hardware.
            result[name]["log_tail"] = err[-4000:]
    ok = (all("SERVING" in result[n]["health"] for n in ("generator-gpu-0", "trainer-gpu"))
          and result["generate_without_token"] == "UNAUTHENTICATED"
          and isinstance(result["generate_tokens"], int) and result["generate_tokens"] > 0)
    result["ok"] = ok
    (pathlib.Path(out_dir) / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
