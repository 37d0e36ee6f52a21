"""Generator benchmark: HF `model.generate` vs our torch engine, direct and through gRPC, and
raw vLLM vs our vllm backend through gRPC.

    .venv/bin/python bench/generator.py                  # tiny Llama (+ SmolLM2-135M when installed)
    .venv/bin/python bench/generator.py --models tiny    # quick run
    .venv/bin/python bench/generator.py --no-vllm        # skip the vLLM part

The vLLM part needs vllm, which lives in .venv-vllm (`make vllm-venv`), not in this venv: when
that venv exists this script runs bench/generator_vllm.py there as a subprocess (same models,
batch 16) and merges its rows and its summary keys (vllm_raw_tok_s, vllm_grpc_tok_s,
vllm_overhead_frac: SmolLM2, batch 16) into bench/results/generator.json; see that script for
how they are measured.

Same model, same batch, same work on every side: `batch` prompts of 16 random token ids (one
length, so HF needs no padding), greedy, exactly 64 new tokens (HF with no eos_token_id, ours
with ignore_eos: EOS neither stops nor is masked), float32. Rounds alternate (HF, engine, gRPC,
HF, ...) so machine noise hits all sides. On a shared host interference only ever slows a
round, so each side's best round is its figure (medians are kept in the rows too).
tokens = batch x 64.

    hf_tok_s     = tokens / min(HF generate seconds)
    engine_tok_s = tokens / min(TorchEngine.generate seconds)                (in-process)
    grpc_tok_s   = tokens / min(GeneratorClient.generate seconds)            (server process, one call)
    ratio_engine_vs_hf = engine_tok_s / hf_tok_s   (tiny, batch 16; target >= 2.0)

`tokens_match` says whether the engine produced exactly HF's tokens. A `mixed_lengths` row adds
what continuous batching buys on RL-like traffic: max_tokens differ per request (8..64), HF must
run the whole batch to the longest, the engine frees each sequence when it is done; only the
requested tokens count. Results go to bench/results/generator.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from forgerpc.clients import GeneratorClient
from forgerpc.services.common.models import ModelNotFoundError, load_model, make_tiny_model, smollm2_dir
from forgerpc.services.generator.backends import Sampling
from forgerpc.services.generator.backends.torch_engine import TorchEngine
from forgerpc.v1.common_pb2 import Prompt, SamplingParams

OUT = pathlib.Path(__file__).parent / "results" / "generator.json"
VLLM_PYTHON = pathlib.Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
VLLM_KEYS = ("vllm_raw_tok_s", "vllm_grpc_tok_s", "vllm_overhead_frac", "vllm_overhead_frac_best")
NEW_TOKENS = 64
PROMPT_LEN = 16


def prompts(batch: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(4, vocab, (batch, PROMPT_LEN), generator=g)


def hf_generate(model, ids: torch.Tensor, new: int) -> tuple[float, list[list[int]]]:
    """Greedy, exactly `new` tokens. The caller cleared generation_config.eos_token_id, so EOS
    neither stops HF nor is masked out (min_new_tokens would mask it): ignore_eos semantics."""
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=0)
    return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()


async def engine_generate(engine: TorchEngine, ids: torch.Tensor, lengths: list[int]):
    start = time.perf_counter()
    groups = {}
    for n in sorted(set(lengths)):  # one call per max_tokens value, all concurrent
        rows = [i for i, m in enumerate(lengths) if m == n]
        groups[n] = (rows, engine.generate([(str(i), ids[i].tolist()) for i in rows],
                                           Sampling(max_tokens=n, ignore_eos=True)))
    results = await asyncio.gather(*(call for _, call in groups.values()))
    seconds = time.perf_counter() - start
    tokens = [None] * len(lengths)
    for (rows, _), outs in zip(groups.values(), results):
        for i, out in zip(rows, outs):
            tokens[i] = out.token_ids
    return seconds, tokens


async def grpc_generate(client: GeneratorClient, ids: torch.Tensor, new: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = await client.generate(prompts=[Prompt(token_ids=row) for row in ids.tolist()],
                                sampling_params=SamplingParams(max_tokens=new, ignore_eos=True), timeout=600)
    return time.perf_counter() - start, [list(c.token_ids) for c in out.completions]


class Server:
    """`forgerpc serve generator` on `path`, as its own process."""

    def __init__(self, path: pathlib.Path, threads: int):
        args = [sys.executable, "-m", "forgerpc.services", "serve", "generator", "--port", "0",
                f"model_path={path}", "max_batch_size=64", f"torch_threads={threads}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("FORGERPC_READY"):
            self.proc.kill()
            raise RuntimeError(f"generator did not start: {line!r}")
        self.address = line.split()[2]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def bench_model(name: str, path: pathlib.Path, batches: list[int], rounds: int, threads: int) -> list[dict]:
    """All rows for one model. HF runs on the engine's worker thread: torch's OpenMP thread team
    belongs to the thread that calls it, and a second team (HF's on the main thread) spinning
    after its turn slowed the in-process engine by up to a third on this 2-core host."""
    model, _ = load_model(path)
    model.generation_config.eos_token_id = None  # see hf_generate
    engine = TorchEngine(str(path), max_batch_size=max(batches))
    engine.start()
    server = Server(path, threads)
    rows = []
    loop = asyncio.get_running_loop()

    async def hf(ids, new):
        return await loop.run_in_executor(engine._executor, hf_generate, model, ids, new)

    try:
        async with GeneratorClient(server.address, timeout=600) as client:
            vocab = model.config.vocab_size
            warm = prompts(2, vocab)  # first calls pay one-off costs (allocation, lazy init)
            await hf(warm, 4)
            await engine_generate(engine, warm, [4, 4])
            await grpc_generate(client, warm, 4)
            for batch in batches:
                ids = prompts(batch, vocab)
                tokens = batch * NEW_TOKENS
                times = {"hf": [], "engine": [], "grpc": []}
                for _ in range(rounds):
                    t, hf_tokens = await hf(ids, NEW_TOKENS)
                    times["hf"].append(t)
                    t, engine_tokens = await engine_generate(engine, ids, [NEW_TOKENS] * batch)
                    times["engine"].append(t)
                    t, grpc_tokens = await grpc_generate(client, ids, NEW_TOKENS)
                    times["grpc"].append(t)
                best = {k: min(v) for k, v in times.items()}
                row = {"model": name, "workload": "fixed_64", "batch": batch, "new_tokens": NEW_TOKENS,
                       "hf_tok_s": tokens / best["hf"], "engine_tok_s": tokens / best["engine"],
                       "grpc_tok_s": tokens / best["grpc"], "rounds": rounds,
                       "median_tok_s": {k: tokens / statistics.median(v) for k, v in times.items()},
                       "tokens_match": hf_tokens == engine_tokens == grpc_tokens}
                row["ratio_engine_vs_hf"] = row["engine_tok_s"] / row["hf_tok_s"]
                row["ratio_grpc_vs_hf"] = row["grpc_tok_s"] / row["hf_tok_s"]
                rows.append(row)
                print(f"{name:8} b={batch:3} hf {row['hf_tok_s']:8.1f}  engine {row['engine_tok_s']:8.1f}  "
                      f"grpc {row['grpc_tok_s']:8.1f} tok/s  x{row['ratio_engine_vs_hf']:.2f} "
                      f"(grpc x{row['ratio_grpc_vs_hf']:.2f})  match={row['tokens_match']}", flush=True)
            # mixed lengths: RL-like traffic, only requested tokens count
            batch = max(batches)
            ids = prompts(batch, vocab)
            lengths = [8 + (i * 37) % (NEW_TOKENS - 7) for i in range(batch)]
            useful = sum(lengths)
            t_hf, t_eng = [], []
            for _ in range(rounds):
                t_hf.append((await hf(ids, max(lengths)))[0])
                t_eng.append((await engine_generate(engine, ids, lengths))[0])
            t_hf, t_eng = min(t_hf), min(t_eng)
            row = {"model": name, "workload": "mixed_lengths", "batch": batch, "new_tokens": f"8..{NEW_TOKENS}",
                   "hf_tok_s": useful / t_hf, "engine_tok_s": useful / t_eng, "rounds": rounds}
            row["ratio_engine_vs_hf"] = row["engine_tok_s"] / row["hf_tok_s"]
            rows.append(row)
            print(f"{name:8} b={batch:3} mixed lengths: hf {row['hf_tok_s']:8.1f}  engine {row['engine_tok_s']:8.1f} "
                  f"useful tok/s  x{row['ratio_engine_vs_hf']:.2f}", flush=True)
    finally:
        server.stop()
        await engine.close()
    return rows


def run_vllm_part(models: str, rounds: int) -> dict | None:
    """bench/generator_vllm.py in .venv-vllm, as a subprocess; its result dict, or None without
    that venv. Runs after the torch part, so the two never compete for the CPU."""
    if not VLLM_PYTHON.exists():
        print(f"vllm part skipped: no {VLLM_PYTHON} (make vllm-venv)", flush=True)
        return None
    with tempfile.TemporaryDirectory(prefix="bench-generator-") as tmp:
        out = pathlib.Path(tmp) / "generator_vllm.json"
        cmd = [str(VLLM_PYTHON), str(pathlib.Path(__file__).with_name("generator_vllm.py")), "--models", models,
               "--batches", "16", "--rounds", str(rounds), "--out", str(out)]
        print("vllm part:", " ".join(cmd), flush=True)
        done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": ""})
        if done.returncode != 0 or not out.exists():
            print(f"vllm part failed (exit {done.returncode})", flush=True)
            return None
        result = json.loads(out.read_text())
    vllm_out = OUT.with_name("generator_vllm.json")  # keep its own file current as well
    vllm_out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def pick(rows, model, batch, key):
    for r in rows:
        if r["model"] == model and r["batch"] == batch and r["workload"] == "fixed_64":
            return r[key]
    return None


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma list of tiny, smollm2")
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for every side; 0 = default")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM part (.venv-vllm subprocess)")
    parser.add_argument("--vllm-rounds", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "tiny":
                path = make_tiny_model(pathlib.Path(tmp) / "tiny", initializer_range=0.1)
                rows += await bench_model("tiny", path, batches, args.rounds, args.threads)
            elif name == "smollm2":
                try:
                    path = smollm2_dir()
                except ModelNotFoundError as e:
                    print(f"smollm2 skipped: {e}")
                    continue
                rows += await bench_model("smollm2", path, batches, max(1, args.rounds - 1), args.threads)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "python bench/generator.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
                    "torch": torch.__version__},
        "rows": rows,
        "ratio_engine_vs_hf": pick(rows, "tiny", 16, "ratio_engine_vs_hf"),
        "ratio_engine_grpc_vs_hf": pick(rows, "tiny", 16, "ratio_grpc_vs_hf"),
        "ratio_engine_vs_hf_smollm2": pick(rows, "smollm2", 16, "ratio_engine_vs_hf"),
        "target_ratio": 2.0,
    }
    vllm = None if args.no_vllm else run_vllm_part(args.models, args.vllm_rounds)
    if vllm is not None:
        result["rows"] += [{"workload": "vllm_fixed_64", **r} for r in vllm["rows"]]
        result |= {k: vllm[k] for k in VLLM_KEYS if k in vllm}
        result["vllm_summary_model"] = vllm.get("summary_model")
        result["vllm_machine"] = vllm["machine"]
        result["target_vllm_overhead_frac"] = 0.10
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}: ratio_engine_vs_hf={result['ratio_engine_vs_hf']}, "
          f"ratio_engine_grpc_vs_hf={result['ratio_engine_grpc_vs_hf']}, "
          f"ratio_engine_vs_hf_smollm2={result['ratio_engine_vs_hf_smollm2']}, "
          f"vllm_overhead_frac={result.get('vllm_overhead_frac')}")


if __name__ == "__main__":
    asyncio.run(main())
