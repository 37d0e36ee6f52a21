"""Trainer service: policy-gradient and SFT training steps, checkpoints, weight publishing."""
