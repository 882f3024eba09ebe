"""Sequence-parallel strategies, one per file; registry.py maps names to classes (issues #3, #4)."""
