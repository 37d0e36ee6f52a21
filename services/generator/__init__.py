"""GeneratorService: turns prompts into completions (token ids, text, logprobs, policy version)
and hot-swaps its weights. Backends: `torch` (our engine, backends/torch_engine.py) and `vllm`."""
