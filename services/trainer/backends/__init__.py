"""Trainer backends; each one file with the same interface (see torch_backend.TorchBackend)."""
