"""Trainer backends, one file each, chosen by `TrainerConfig.backend`.

Each entry names a module with `build(cfg, model_path) -> backend`; the server needs of a backend:
`train_step(samples, objective, learning_rate) -> StepResult`, `full_state_dict()` (HF names),
`save_pretrained(dir) -> bytes`, `save_checkpoint(root, keep)`, `load_checkpoint(path) -> meta`,
and the attributes `name`, `step`, `policy_version`, `data_position`, `vocab_size`, `max_positions`
(see torch_backend.TorchBackend). Modules are imported only when chosen (titan pulls in torchtitan).
"""

BACKENDS = {
    "torch": "forgerpc.services.trainer.backends.torch_backend",
    "titan": "forgerpc.services.trainer.backends.titan_backend",  # GPU training; needs the [titan] extra
}


def build(cfg, model_path: str):
    """Imports the configured backend's module and builds the backend over `model_path`."""
    import importlib

    return importlib.import_module(BACKENDS[cfg.backend]).build(cfg, model_path)
