"""Integrations with other training frameworks; each subpackage is the only importer of its framework."""
