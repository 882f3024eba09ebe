"""Sequence-parallel strategies, one per file; registry.py maps names to classes."""
