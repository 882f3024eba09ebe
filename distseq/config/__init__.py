"""Typed, strict configuration dataclasses and the YAML loader (issue #6); no torch import here."""
