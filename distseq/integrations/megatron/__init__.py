"""Megatron-Core plugin; the only module that imports megatron."""
