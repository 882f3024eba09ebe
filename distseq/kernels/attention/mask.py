"""Block classification and attention masks from global token positions and document ids.

Every softmax strategy computes attention per (query chunk, key chunk) pair. Whether a pair needs work, and
which mask it needs, follows from the global positions of its tokens and, for packed input, their document
ids alone: query ``i`` may attend key ``j`` iff ``k_pos[j] <= q_pos[i]`` (when causal) and
``q_doc[i] == k_doc[j]`` (when documents are given). Written once here, this rule serves every layout.
"""

from __future__ import annotations

import enum

import torch

__all__ = ["BlockKind", "block_mask", "classify_block"]


class BlockKind(enum.Enum):
    """What a (query block, key block) pair needs.

    * ``EMPTY``: no query may attend any key; skip the block (never merge an all ``-inf`` result).
    * ``FULL``: every query attends every key; no mask.
    * ``CAUSAL``: the allowed pairs are exactly ``k_pos <= q_pos`` and both blocks are the same contiguous
      run of positions, so the cheap top-left diagonal mask (``is_causal``) applies.
    * ``MASKED``: anything else; needs the explicit boolean mask.
    """

    EMPTY = "empty"
    FULL = "full"
    CAUSAL = "causal"
    MASKED = "masked"


def _check_ids(name: str, ids: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a 1-D integer tensor, got {type(ids).__name__}")
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor, got shape={tuple(ids.shape)} dtype={ids.dtype}")


def _check_positions(
    q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: torch.Tensor | None, k_doc: torch.Tensor | None
) -> None:
    _check_ids("q_pos", q_pos)
    _check_ids("k_pos", k_pos)
    if (q_doc is None) != (k_doc is None):
        raise ValueError(
            f"q_doc and k_doc must be given together, got q_doc={'None' if q_doc is None else 'tensor'} "
            f"k_doc={'None' if k_doc is None else 'tensor'}"
        )
    if q_doc is not None:
        _check_ids("q_doc", q_doc)
        _check_ids("k_doc", k_doc)
        if q_doc.numel() != q_pos.numel() or k_doc.numel() != k_pos.numel():
            raise ValueError(
                f"document ids must match positions in length: q_doc={q_doc.numel()} q_pos={q_pos.numel()}, "
                f"k_doc={k_doc.numel()} k_pos={k_pos.numel()}"
            )


def _build_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    q_doc: torch.Tensor | None,
    k_doc: torch.Tensor | None,
) -> torch.Tensor:
    mask = torch.ones(q_pos.numel(), k_pos.numel(), dtype=torch.bool, device=q_pos.device)  # [Tq, Tk]
    if causal:
        mask &= k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
    if q_doc is not None:
        mask &= q_doc.unsqueeze(1) == k_doc.unsqueeze(0)
    return mask


def _same_contiguous_run(q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    if q_pos.shape != k_pos.shape or not torch.equal(q_pos, k_pos):
        return False
    return bool((torch.diff(q_pos) == 1).all())


def _classify(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    q_doc: torch.Tensor | None,
    k_doc: torch.Tensor | None,
) -> tuple[BlockKind, torch.Tensor | None]:
    """The block's kind, plus its mask when building the mask was needed to decide (else None)."""
    if q_pos.numel() == 0 or k_pos.numel() == 0:
        return BlockKind.EMPTY, None
    extremes = [q_pos.min(), q_pos.max(), k_pos.min(), k_pos.max()]
    if q_doc is not None:
        extremes += [q_doc.min(), q_doc.max(), k_doc.min(), k_doc.max()]
    # one host sync for all extremes
    q_lo, q_hi, k_lo, k_hi, *doc_extremes = torch.stack(extremes).tolist()

    if causal and q_hi < k_lo:
        return BlockKind.EMPTY, None
    one_doc = True
    if q_doc is not None:
        qd_lo, qd_hi, kd_lo, kd_hi = doc_extremes
        if qd_hi < kd_lo or kd_hi < qd_lo:
            return BlockKind.EMPTY, None
        one_doc = qd_lo == qd_hi == kd_lo == kd_hi
    if one_doc:
        # The doc test passes for every pair, so only causality can forbid one; and if q_lo < k_hi the
        # pair (q_lo, k_hi) is forbidden, so the block cannot be FULL below.
        if not causal or q_lo >= k_hi:
            return BlockKind.FULL, None
        if _same_contiguous_run(q_pos, k_pos):
            return BlockKind.CAUSAL, None
    # Past this point FULL and CAUSAL are ruled out (FULL and CAUSAL both need every pair's documents to
    # match, i.e. one_doc), so only EMPTY versus MASKED is left to decide from the mask itself.
    mask = _build_mask(q_pos, k_pos, causal, q_doc, k_doc)
    if not bool(mask.any()):
        return BlockKind.EMPTY, mask
    return BlockKind.MASKED, mask


def _kind_and_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    q_doc: torch.Tensor | None,
    k_doc: torch.Tensor | None,
) -> tuple[BlockKind, torch.Tensor | None]:
    """The block's kind and its ``[Tq, Tk]`` mask, None exactly when the block is FULL."""
    kind, mask = _classify(q_pos, k_pos, causal, q_doc, k_doc)
    if kind is BlockKind.FULL:
        return kind, None
    if mask is None:
        mask = _build_mask(q_pos, k_pos, causal, q_doc, k_doc)
    return kind, mask


def classify_block(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> BlockKind:
    """Classify a (query block, key block) pair from positions and document ids.

    Decided from the min/max of positions and document ids where possible; the explicit mask is built only
    when those do not settle it. A block with no queries or no keys is EMPTY.

    Args:
        q_pos: ``[Tq]`` int global positions of the queries (need not be contiguous).
        k_pos: ``[Tk]`` int global positions of the keys.
        causal: forbid keys after the query (``k_pos > q_pos``).
        q_doc: ``[Tq]`` int document id per query, or None (no documents). Given together with ``k_doc``.
        k_doc: ``[Tk]`` int document id per key, or None.
    """
    _check_positions(q_pos, k_pos, q_doc, k_doc)
    return _classify(q_pos, k_pos, causal, q_doc, k_doc)[0]


def block_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean ``[Tq, Tk]`` mask, True where query ``i`` may attend key ``j``; None when the block is FULL.

    Arguments as in :func:`classify_block`. An EMPTY block gets an all-False mask.
    """
    _check_positions(q_pos, k_pos, q_doc, k_doc)
    return _kind_and_mask(q_pos, k_pos, causal, q_doc, k_doc)[1]
