"""Trainer, data, optimizer, checkpoints and metrics (issue #6)."""
