"""The stack config: which services to run (or reach by address) and how many replicas.

    # forgerpc up configs/stack_local.yaml
    services:
      reward: {replicas: 1, config: {functions: [{kind: exact_match}]}}
      generator: {replicas: 2}
      trainer: {address: "10.0.0.5:50051"}   # run elsewhere: use it, start nothing
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from forgerpc.clients.config import ClientConfig, Config

SERVICE_NAMES = ("generator", "reward", "replay_buffer", "trainer", "weight_store", "sandbox", "environment")


class ServiceEntry(Config):
    replicas: int = Field(default=1, ge=1, le=64)
    # Addresses of already-running replicas (a user's own implementation, a remote cluster).
    # When set, nothing is started for this service.
    address: str | list[str] | None = None
    # The service's own config (what `forgerpc serve <name> --config` would read).
    config: dict[str, Any] = Field(default_factory=dict)
    # CPU cores every replica is pinned to (`taskset`, all threads); empty = wherever the OS puts it.
    cpus: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)

    def addresses(self) -> list[str]:
        if self.address is None:
            return []
        return [self.address] if isinstance(self.address, str) else list(self.address)


class StackConfig(Config):
    services: dict[str, ServiceEntry] = Field(default_factory=dict)
    client: ClientConfig = ClientConfig()
    run_dir: str = "runs/latest"
    start_timeout_seconds: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _known_services(self):
        for name in self.services:
            if name not in SERVICE_NAMES:
                raise ValueError(f"unknown service '{name}' under 'services' (allowed: {', '.join(SERVICE_NAMES)})")
        return self


class TaskConfig(Config):
    name: Literal["addition", "multiplication", "reverse", "code"] = "addition"
    seed: int = 0
    eval_size: int = Field(default=200, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)  # e.g. {digits: 3}


class GRPOConfig(Config):
    group_size: int = Field(default=8, ge=2)
    prompts_per_step: int = Field(default=16, ge=1)
    steps: int = Field(default=100, ge=1)
    # Wall-clock budget of the GRPO phase: the step that crosses it is the last one (final eval and
    # checkpoint as at `steps`). 0 = run all `steps`. A resumed run gets the budget afresh.
    max_seconds: float = Field(default=0, ge=0)
    max_staleness: int = Field(default=0, ge=0)
    publish_every: int = Field(default=1, ge=1)
    eval_every: int = Field(default=20, ge=1)
    eval_size: int = Field(default=100, ge=1)
    rollout_workers: int = Field(default=4, ge=1)
    # Prompts (groups) per rollout: one Generate, one Evaluate and one AddEpisodes for all of them.
    # A gRPC call costs ~0.3 ms of CPU in the caller and ~0.5 ms in the service on these machines
    # whatever its size, so with 1 the framework's ceiling is ~2,000 episodes/s on 2 cores
    # (bench/README.md, null path). Must divide prompts_per_step.
    groups_per_rollout: int = Field(default=1, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    max_tokens: int = Field(default=8, ge=1)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    std_normalize: bool = True
    # DAPO's dynamic sampling (Yu et al. 2025): a group whose rewards are all equal has advantage 0
    # everywhere and teaches nothing, so the rollout drops it and samples another prompt; training
    # batches then hold only groups with a signal. (The replay buffer's own
    # filter_equal_reward_groups is for other producers: with it, GRPO gets permits back only once
    # per step.)
    drop_equal_reward_groups: bool = False
    # Optimizer steps per batch (the GRPO paper's mu, TRL's num_iterations): later passes see a
    # policy that has moved since the generator sampled, and the PPO ratio's clip bounds how far it
    # goes. Each pass is one trainer step, so the trainer's optim.total_steps counts passes.
    ppo_epochs: int = Field(default=1, ge=1)
    # The first GRPO step of a run (not of a resumed one) starts from fresh AdamW moments and a
    # restarted schedule, as a run from an SFT checkpoint would (no visible effect on grpo_tiny's
    # learning: bench/README.md, E1 vs E2; it keeps GRPO independent of how long SFT ran).
    reset_optimizer: bool = True
    seed: int = 0
    # Trainer checkpoint (+ the app's data position) every K steps and at the last step; 0 = last
    # step only. `forgerpc run CONFIG --resume RUN_DIR` continues from the newest one.
    checkpoint_every: int = Field(default=50, ge=0)

    @model_validator(mode="after")
    def _whole_rollouts_per_step(self):
        # A step trains prompts_per_step groups; rollouts of k groups must fill it exactly, or the
        # last groups of a step would wait (holding permits) for a rollout that never starts.
        if self.prompts_per_step % self.groups_per_rollout:
            raise ValueError(f"key 'grpo.groups_per_rollout': {self.groups_per_rollout} must divide "
                             f"grpo.prompts_per_step ({self.prompts_per_step})")
        return self


class SFTConfig(Config):
    steps: int = Field(default=0, ge=0)  # 0 = no SFT (warm start skipped)
    batch_size: int = Field(default=64, ge=1)
    eval_every: int = Field(default=50, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)  # SFT's own rate; the RL schedule is untouched
    # Per-step SFT rate (orchestrator/sft.py `sft_lr`): linear warmup over `warmup_steps`, then
    # constant, or cosine/linear decay to learning_rate * min_lr_ratio at the last step.
    # The floor stays > 0: a rate of 0 on the wire means "the trainer's own (RL) schedule".
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.1, gt=0, le=1)
    # Stop early once greedy accuracy on `check_size` TRAINING prompts (a fixed sample, never the
    # held-out eval split) reaches this, checked every eval_every steps; 0 = always run `steps`.
    # The tiny model's breakthrough to exact sums comes at a seed-dependent step
    # (~600-2800 steps, bench/README.md).
    until_accuracy: float = Field(default=0.0, ge=0, le=1)
    check_size: int = Field(default=200, ge=1)


class ModelConfig(Config):
    """The policy both the generator and the trainer start from (one directory, same weights)."""

    path: str = ""  # local HF directory; empty = build a tiny random model in RUN_DIR/model
    arch: Literal["llama", "qwen2", "qwen3"] = "llama"
    hidden_size: int = Field(default=128, gt=0)
    layers: int = Field(default=4, gt=0)
    heads: int = Field(default=4, gt=0)
    kv_heads: int = Field(default=2, gt=0)
    intermediate_size: int = Field(default=0, ge=0)  # the MLP's width; 0 = 2 x hidden_size
    bos: bool = False  # the tiny tokenizer puts BOS before each prompt, as Llama's does
    seed: int = 0


class RunConfig(StackConfig):
    """A whole run: the stack plus the app. `forgerpc run` reads this."""

    app: Literal["none", "grpo", "sft"] = "none"
    # Redis for the episode stream; empty = start a private redis-server for this run.
    redis_url: str = ""
    # Fraction of traces kept (head sampling at each root span; every service follows the root's
    # decision through the traceparent it receives). Tracing each call costs ~25% of the
    # framework's CPU in a busy loop (bench/pipeline.py), so big runs keep a sample.
    trace_sample_ratio: float = Field(default=1.0, ge=0, le=1)
    # OTLP/gRPC endpoint (e.g. http://otel-collector:4317) for the traces and metrics of every
    # process, besides the run directory's files; empty: OTEL_EXPORTER_OTLP_ENDPOINT if set.
    otlp_endpoint: str = ""
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    sft: SFTConfig = SFTConfig()
    grpo: GRPOConfig = GRPOConfig()

    @model_validator(mode="after")
    def _trainer_knows_the_sampling_temperature(self):
        # The generator's logprobs are those of log_softmax(logits / T); a trainer computing T = 1
        # logprobs would take a biased PPO ratio. When this config starts the trainer, a trainer
        # config without loss.temperature takes grpo.temperature; one that names another is an error.
        spec = self.services.get("trainer")
        if self.app != "grpo" or spec is None or spec.addresses() or self.grpo.temperature == 0:
            return self
        loss = spec.config.setdefault("loss", {})
        if not isinstance(loss, dict):
            return self  # the trainer's own config check names services.trainer.config.loss
        trainer_t = loss.setdefault("temperature", self.grpo.temperature)
        if abs(float(trainer_t) - self.grpo.temperature) > 1e-6:
            raise ValueError(f"key 'grpo.temperature': {self.grpo.temperature} differs from "
                             f"services.trainer.config.loss.temperature ({trainer_t}); set both to the "
                             "sampling temperature so that the trainer's logprobs match the generator's")
        return self
