"""Trainer, data, optimizer, checkpoints and metrics."""
