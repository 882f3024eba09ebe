"""The process groups a distseq module inside a Megatron-Core model runs over."""

from __future__ import annotations

from typing import Any

__all__ = ["cp_and_tp_groups"]


def cp_and_tp_groups(pg_collection: Any) -> tuple[Any, Any]:
    """(the context-parallel group, the tensor-parallel group): from the ``pg_collection`` Megatron passes
    when it builds a module, else from Megatron's global parallel state."""
    if pg_collection is not None and hasattr(pg_collection, "cp") and hasattr(pg_collection, "tp"):
        return pg_collection.cp, pg_collection.tp
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_group(), parallel_state.get_tensor_model_parallel_group()
