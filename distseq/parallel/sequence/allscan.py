"""All-Scan: the state scan of linear layers as a pipelined chain of point-to-point hops (ZeCO's collective).

LASP-2 all-gathers every chunk's state to every rank: each rank receives ``(P-1) nc`` states and nothing can
finish before the whole gather lands. All-Scan gives each rank exactly the state it needs: the chunks are visited
in sequence order (``0 .. P-1`` on the contiguous layout; ``0 .. P-1`` over the first chunks and ``P-1 .. 0``
over the second ones on zigzag, so no token is permuted), each owner receives the state entering its chunk from
the owner of the chunk before, combines it with its own chunk, and forwards the result. The state travels in
``block`` pieces (rows of the ``K x V`` state for linear attention, columns for the delta rule's affine maps, so
each piece combines on its own): the next rank combines piece ``i`` while this one works on piece ``i + 1``,
and the ``P``-hop latency becomes one hop per piece plus the pipeline fill. Receives are posted before the local
intra-chunk work, so a rank's own compute overlaps its predecessors' part of the scan.

Rules (``S_c``: the state entering chunk ``c``):

* linear attention: ``S_{c+1} = exp(A_c) S_c + M_c`` (a scalar decay per head: row blocks are independent);
* delta rule: ``S_{c+1} = M_c S_c + N_c`` (``M_c`` ``K x K``: column blocks are independent).

The backward runs the chain in reverse with the adjoint rule (``g_c = dS_c + exp(A_c) g_{c+1}``, or
``dS_c + M_c^T g_{c+1}``), in the same pieces.

Communication per rank and direction: one state ``B H K V a`` bytes per chunk boundary whose next chunk another
rank owns (``a`` = 4, 8 for fp64): on zigzag a rank sends and receives at most 2 states, on contiguous 1; LASP-2
receives ``(P-1) nc`` states (plus a decay scalar each).
"""

from __future__ import annotations

import torch

from distseq.parallel.comm import Communicator, P2PExchange
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence._linear import LinearStateStrategy, without_autocast

__all__ = ["AllScan", "ScanRule", "pipelined_scan"]


def _blocks(size: int, block: int | None) -> list[slice]:
    step = size if block is None else block
    return [slice(i, min(i + step, size)) for i in range(0, size, step)]


def _steps(layout: SequenceLayout, rank: int) -> list[tuple[int, int, int | None, int | None]]:
    """This rank's chunks in sequence order: (global chunk, local index, owner of the chunk before or None, owner of
    the chunk after or None)."""
    local = layout.chunk_indices_of(rank)
    return [(c, local.index(c), before, after) for c, before, after in layout.chunk_neighbours(rank)]


class ScanRule:
    """How one chunk's summary acts on the state entering it, piece by piece, and the adjoint of that.

    ``decay`` (linear attention): ``maps`` are the chunks' states ``M_c`` ``[nc, B, H, K, V]`` and ``carries`` their
    log decays ``[nc, B, H]``; pieces are row blocks. ``affine`` (delta rule): ``maps`` ``[nc, B, H, K, K]``,
    ``carries`` the increments ``N_c`` ``[nc, B, H, K, V]``; pieces are column blocks.
    """

    def __init__(self, kind: str, maps: torch.Tensor, carries: torch.Tensor, block: int | None):
        self.kind, self.maps, self.carries = kind, maps, carries
        state_shape = maps.shape[1:] if kind == "decay" else carries.shape[1:]
        self.state_shape = state_shape  # [B, H, K, V]
        self.axis = -2 if kind == "decay" else -1
        self.pieces = _blocks(state_shape[self.axis], block)

    def piece(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x[..., self.pieces[i], :] if self.axis == -2 else x[..., self.pieces[i]]

    def zeros(self, i: int) -> torch.Tensor:
        shape = list(self.state_shape)
        shape[self.axis] = self.pieces[i].stop - self.pieces[i].start
        return self.maps.new_zeros(shape)

    def step(self, local: int, i: int, entering: torch.Tensor) -> torch.Tensor:
        """Piece ``i`` of the state after local chunk ``local`` from piece ``i`` of the state entering it."""
        if self.kind == "decay":
            return torch.exp(self.carries[local])[..., None, None] * entering + self.piece(self.maps[local], i)
        return self.maps[local] @ entering + self.piece(self.carries[local], i)

    def adjoint(
        self, local: int, i: int, entering: torch.Tensor, after: torch.Tensor, d_maps, d_carries
    ) -> torch.Tensor:
        """Piece ``i`` of the gradient reaching the entering state from ``after`` (the gradient of the state after
        the chunk); adds piece ``i``'s share to ``d_maps`` and ``d_carries`` of the chunk."""
        if self.kind == "decay":
            decay = torch.exp(self.carries[local])
            self.piece(d_maps[local], i).copy_(after)
            d_carries[local] += decay * (entering * after).sum((-1, -2))
            return decay[..., None, None] * after
        d_maps[local] += after @ entering.transpose(-1, -2)
        self.piece(d_carries[local], i).copy_(after)
        return self.maps[local].transpose(-1, -2) @ after


class _Pending:
    """Receives posted ahead of the work they overlap: ``take(c, i)`` waits for piece ``i`` entering chunk ``c``."""

    def __init__(self):
        self.exchanges: dict[tuple[int, int], P2PExchange] = {}

    def take(self, c: int, i: int) -> torch.Tensor:
        return self.exchanges.pop((c, i)).wait()[0]


def _tag(c: int, i: int, pieces: int) -> int:
    return c * pieces + i


def post_receives(comm: Communicator, layout: SequenceLayout, rule: ScanRule, *, backward: bool) -> _Pending:
    """Post every receive this rank's part of the chain needs (forward: the states entering its chunks from
    another rank; backward: the gradients of the states after them)."""
    pending = _Pending()
    for c, _, before, after in _steps(layout, comm.rank):
        peer = after if backward else before
        if peer is None or peer == comm.rank:
            continue
        for i in range(len(rule.pieces)):
            # tags name the chunk boundary the piece crosses: (c - 1 | c) forward, (c | c + 1) backward
            tag = _tag(c + 1 if backward else c, i, len(rule.pieces))
            exchange = comm.send_recv(rule.zeros(i), comm.rank - peer, tag=tag, send=False).commit()
            pending.exchanges[(c, i)] = exchange
    return pending


def pipelined_scan(comm: Communicator, layout: SequenceLayout, rule: ScanRule, pending: _Pending) -> torch.Tensor:
    """The states entering this rank's chunks ``[nc, B, H, K, V]`` (local order)."""
    n = len(rule.pieces)
    entering: list[list[torch.Tensor] | None] = [None] * len(layout.chunks())
    carried: list[torch.Tensor] | None = None  # the state after this rank's previous chunk, when it is the one before
    sends = []
    for c, local, before, after in _steps(layout, comm.rank):
        pieces, carried_next = [], []
        for i in range(n):  # piece i goes on before piece i + 1 is awaited
            if before is None:
                piece = rule.zeros(i)
            elif before == comm.rank:
                piece = carried[i]
            else:
                piece = pending.take(c, i)
            pieces.append(piece)
            out = rule.step(local, i, piece)
            carried_next.append(out)
            if after is not None and after != comm.rank:
                sends.append(comm.send_recv(out, after - comm.rank, tag=_tag(c + 1, i, n), recv=False).commit())
        entering[local], carried = pieces, carried_next
    for exchange in sends:
        exchange.wait()
    return torch.stack([torch.cat(p, dim=rule.axis) for p in entering])


def pipelined_scan_backward(
    comm: Communicator, layout: SequenceLayout, rule: ScanRule, entering: torch.Tensor, d_entering: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the rule's ``maps`` and ``carries`` from those of the entering states: the chain in reverse."""
    n = len(rule.pieces)
    pending = post_receives(comm, layout, rule, backward=True)
    d_maps, d_carries = torch.zeros_like(rule.maps), torch.zeros_like(rule.carries)
    returned: list[torch.Tensor] | None = None  # gradient entering this rank's later chunk, when it is the next one
    sends = []
    for c, local, before, after in reversed(_steps(layout, comm.rank)):
        grads = []
        for i in range(n):
            grad = rule.piece(d_entering[local], i)
            if after is not None:
                after_grad = returned[i] if after == comm.rank else pending.take(c, i)
                entering_piece = rule.piece(entering[local], i)
                grad = grad + rule.adjoint(local, i, entering_piece, after_grad, d_maps, d_carries)
            grads.append(grad)
            if before is not None and before != comm.rank:
                sends.append(comm.send_recv(grad, before - comm.rank, tag=_tag(c, i, n), recv=False).commit())
        returned = grads
    for exchange in sends:
        exchange.wait()
    return d_maps, d_carries


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, maps, carries, kind: str, block, comm: Communicator, layout: SequenceLayout, pending):
        rule = ScanRule(kind, maps, carries, block)
        entering = pipelined_scan(comm, layout, rule, pending)
        ctx.save_for_backward(maps, carries, entering)
        ctx.kind, ctx.block, ctx.comm, ctx.layout = kind, block, comm, layout
        return entering

    @staticmethod
    def backward(ctx, d_entering):
        maps, carries, entering = ctx.saved_tensors
        rule = ScanRule(ctx.kind, maps, carries, ctx.block)
        d_maps, d_carries = pipelined_scan_backward(ctx.comm, ctx.layout, rule, entering, d_entering)
        return d_maps, d_carries, None, None, None, None, None


def scan_states(
    comm: Communicator, layout: SequenceLayout, kind: str, maps: torch.Tensor, carries: torch.Tensor, block, pending
) -> torch.Tensor:
    """Differentiable :func:`pipelined_scan`; ``pending`` from :func:`post_receives` (posted by the caller before
    the work that should overlap the scan)."""
    return _Scan.apply(maps, carries, kind, block, comm, layout, pending)


class AllScan(LinearStateStrategy):
    """All-Scan linear-attention sequence parallelism: LASP-2's local math, a pipelined point-to-point scan in
    place of its all-gather (``block``: rows (linear attention) or columns (delta rule) of the state per piece;
    None sends each state whole)."""

    name = "allscan"
    delta_exchange = "scan"  # the delta rule's entering states along the chain, ``block`` columns per piece

    def __init__(
        self,
        comm: Communicator,
        layout: SequenceLayout,
        *,
        chunk_size: int = 64,
        backend: str = "torch",
        block: int | None = None,
    ):
        super().__init__(comm, layout, chunk_size=chunk_size, backend=backend)
        if block is not None and block < 1:
            raise ValueError(f"allscan block must be >= 1 (or None for whole states), got {block}")
        self.block: int | None = block

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor | None) -> torch.Tensor:
        return without_autocast(self._scan, q, k, v, log_gate)

    def _scan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor | None) -> torch.Tensor:
        local = self._local(q, k, v, log_gate)
        states, carries, prefix = local.states()
        pending = post_receives(self.comm, self.layout, ScanRule("decay", states, carries, self.block), backward=False)
        intra = local.intra(prefix)  # while the states travel towards this rank
        entering = scan_states(self.comm, self.layout, "decay", states, carries, self.block, pending)
        return intra + local.inter(entering)
