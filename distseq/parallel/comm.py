"""The Communicator: every byte sequence parallelism moves goes through one of these.

A ``Communicator`` wraps one ProcessGroup (NCCL on GPU, gloo on CPU). It offers the collectives the
strategies need with tensor-dimension arguments instead of flat buffers, batched point-to-point
exchanges with explicit ``commit()`` / ``wait()`` for overlap, sub-communicators for 2D schemes, NVTX
ranges around every call, and exact byte accounting in ``stats``.

Byte accounting convention (per rank, payload bytes; see docs/communication.md):

* ``all_gather`` of an ``n``-byte input: sent = received = ``(P-1) n``.
* ``reduce_scatter`` of an ``n``-byte input (output ``n/P``): sent = received = ``(P-1) n / P``.
* ``all_to_all`` of an ``n``-byte input split into ``P`` equal parts: sent = received = ``(P-1) n / P``.
* ``all_reduce`` of ``e`` elements of ``s`` bytes, counted as the bandwidth-optimal reduce-scatter +
  all-gather on ``ceil(e/P)``-element parts: sent = received = ``2 (P-1) ceil(e/P) s``.
* ``send_recv``: the bytes of the tensors sent and of those received; nothing when the peer is self.

With ``P == 1`` every collective is a local no-op that still counts one call and zero bytes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from distseq.utils.compat import all_gather_into, reduce_scatter_into
from distseq.utils.nvtx import nvtx_range

__all__ = ["CommHandle", "CommStats", "Communicator", "CommunicationError", "P2PExchange", "PrimitiveStats"]


class CommunicationError(RuntimeError):
    """A collective failed or timed out; the message names the rank, group and call."""


@dataclass
class PrimitiveStats:
    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class CommStats:
    """Exact payload bytes and call counts per primitive for one Communicator."""

    by_primitive: dict[str, PrimitiveStats] = field(default_factory=dict)

    def record(self, primitive: str, sent: int, received: int) -> None:
        entry = self.by_primitive.setdefault(primitive, PrimitiveStats())
        entry.calls += 1
        entry.bytes_sent += sent
        entry.bytes_received += received

    def __getitem__(self, primitive: str) -> PrimitiveStats:
        return self.by_primitive.get(primitive, PrimitiveStats())

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.by_primitive.values())

    @property
    def bytes_received(self) -> int:
        return sum(s.bytes_received for s in self.by_primitive.values())

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.by_primitive.values())

    def reset(self) -> None:
        self.by_primitive.clear()

    def add(self, other: CommStats) -> CommStats:
        """Add ``other``'s counts into these statistics; returns self."""
        for primitive, s in other.by_primitive.items():
            entry = self.by_primitive.setdefault(primitive, PrimitiveStats())
            entry.calls += s.calls
            entry.bytes_sent += s.bytes_sent
            entry.bytes_received += s.bytes_received
        return self

    def as_dict(self) -> dict[str, dict[str, int]]:
        """Plain nested dict, ready for JSON."""
        return {
            name: {"calls": s.calls, "bytes_sent": s.bytes_sent, "bytes_received": s.bytes_received}
            for name, s in sorted(self.by_primitive.items())
        }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CommHandle:
    """An in-flight collective. ``wait()`` blocks until it is done and returns its result."""

    def __init__(self, work: dist.Work | None, finish: Callable[[], torch.Tensor], describe: str):
        self._work = work
        self._finish = finish
        self._describe = describe
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            if self._work is not None:
                try:
                    self._work.wait()
                except Exception as err:  # gloo/NCCL raise RuntimeError subclasses on timeout and abort
                    raise CommunicationError(f"{self._describe} failed: {err}") from err
                self._work = None
            self._result = self._finish()
        return self._result


class P2PExchange:
    """A batch of sends to ``rank + shift`` and receives from ``rank - shift`` in one Communicator.

    Built by :meth:`Communicator.send_recv`; nothing moves until :meth:`commit`. Several exchanges may be
    committed before any is waited on, e.g. both ring directions at once. Receive buffers may be passed
    in to reuse memory across ring steps. A one-sided exchange (``send=False`` or ``recv=False``) lets a
    schedule skip a transfer both ends know is not needed; the tensors then only give the receive shapes.
    """

    def __init__(
        self,
        comm: Communicator,
        tensors: Sequence[torch.Tensor],
        shift: int,
        recv_buffers: Sequence[torch.Tensor] | None,
        tag: int,
        send: bool = True,
        recv: bool = True,
    ):
        if recv_buffers is not None:
            if len(recv_buffers) != len(tensors):
                raise ValueError(f"send_recv got {len(tensors)} tensors but {len(recv_buffers)} receive buffers")
            for t, buf in zip(tensors, recv_buffers, strict=True):
                if t.shape != buf.shape or t.dtype != buf.dtype:
                    raise ValueError(
                        f"receive buffer {tuple(buf.shape)}/{buf.dtype} does not match "
                        f"sent tensor {tuple(t.shape)}/{t.dtype}"
                    )
        self._comm = comm
        self._shift = shift
        self._local = shift % comm.size == 0
        if self._local and send != recv:
            raise ValueError(f"a one-sided send_recv needs a peer other than self: shift={shift}, size={comm.size}")
        self._send = [t.contiguous() for t in tensors] if send else []
        if self._local:
            self._recv = list(self._send)
        elif not recv:
            self._recv = []
        else:
            self._recv = (
                list(recv_buffers)
                if recv_buffers is not None
                else [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
            )
        # Distinct tags per direction keep concurrent exchanges apart when both directions reach the same
        # peer (P == 2); every rank builds the same exchange, so sender and receiver agree on the tag.
        self._tag = tag * 64 + 2 * (abs(shift) % 32) + (shift < 0)
        self._works: list[dist.Work] | None = None
        self._committed = False

    def commit(self) -> P2PExchange:
        if self._committed:
            raise RuntimeError("P2PExchange.commit() called twice")
        self._committed = True
        comm = self._comm
        sent = sum(_nbytes(t) for t in self._send)
        if self._local:
            comm.stats.record("send_recv", 0, 0)
            return self
        dst = comm.ranks[(comm.rank + self._shift) % comm.size]
        src = comm.ranks[(comm.rank - self._shift) % comm.size]
        ops = [dist.P2POp(dist.isend, t, dst, comm.group, self._tag) for t in self._send]
        ops += [dist.P2POp(dist.irecv, t, src, comm.group, self._tag) for t in self._recv]
        if ops:
            with nvtx_range(f"distseq.send_recv[{comm.name}]"):
                self._works = dist.batch_isend_irecv(ops)
        comm.stats.record("send_recv", sent, sum(_nbytes(t) for t in self._recv))
        return self

    def wait(self) -> list[torch.Tensor]:
        if not self._committed:
            raise RuntimeError("P2PExchange.wait() before commit()")
        if self._works is not None:
            describe = self._comm._describe(f"send_recv(shift={self._shift})")
            for work in self._works:
                try:
                    work.wait()
                except Exception as err:
                    raise CommunicationError(f"{describe} failed: {err}") from err
            self._works = None
        return self._recv


class Communicator:
    """One process group, with the collectives sequence parallelism needs and exact byte accounting.

    ``Communicator()`` wraps the world group, or is a single-rank communicator whose collectives are
    local no-ops when torch.distributed is not initialised (single-process runs and references).

    ``packs_messages`` says whether several tensors bound for the same ranks should travel packed into one
    buffer, one collective for all (NCCL: one launch and one large transfer beat several), or each in its own
    collective, all in flight at once (gloo: packing costs a strided copy per tensor that a message of its own
    often does without, and gloo's TCP pairs move one large message slower per byte than several smaller ones:
    ``benchmarks/exchange.py`` measures both). Strategies read it; a test may set it either way.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, name: str = "world"):
        self.name = name
        self.stats = CommStats()
        self.packs_messages = True
        if group is None and not dist.is_initialized():
            self.group = None
            self.rank, self.size, self.ranks = 0, 1, [0]
            return
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of group {name!r}")
        self.size = dist.get_world_size(self.group)
        self.ranks = list(dist.get_process_group_ranks(self.group))
        self.packs_messages = dist.get_backend(self.group) != "gloo"

    @classmethod
    def solo(cls, name: str = "solo") -> Communicator:
        """A single-rank communicator whose collectives are local no-ops, even inside a distributed job."""
        comm = cls.__new__(cls)
        comm.name, comm.stats, comm.group = name, CommStats(), None
        comm.rank, comm.size, comm.ranks = 0, 1, [0]
        comm.packs_messages = True
        return comm

    def view(self, name: str) -> Communicator:
        """The same process group under another name, with byte statistics of its own (one per strategy, say:
        two views of the sp group count the softmax and the linear layers' traffic apart). Creates no group."""
        other = copy.copy(self)
        other.name, other.stats = name, CommStats()
        return other

    def __repr__(self) -> str:
        return f"Communicator(name={self.name!r}, rank={self.rank}, size={self.size}, ranks={self.ranks})"

    def _describe(self, call: str) -> str:
        return f"{call} on group {self.name!r} (rank {self.rank} of {self.size}, global ranks {self.ranks})"

    def _run(
        self,
        primitive: str,
        issue: Callable[[], dist.Work | None],
        finish: Callable[[], torch.Tensor],
        sent: int,
        received: int,
        async_op: bool,
    ) -> torch.Tensor | CommHandle:
        self.stats.record(primitive, sent, received)
        with nvtx_range(f"distseq.{primitive}[{self.name}]"):
            work = issue() if self.size > 1 else None
        handle = CommHandle(work, finish, self._describe(primitive))
        return handle if async_op else handle.wait()

    def all_gather(self, x: torch.Tensor, dim: int = 0, *, async_op: bool = False) -> torch.Tensor | CommHandle:
        """Concatenate every rank's ``x`` along ``dim`` in rank order. All ranks pass the same shape."""
        dim = dim % x.dim()
        if self.size == 1:
            return self._run("all_gather", lambda: None, lambda: x, 0, 0, async_op)
        x0 = x.movedim(dim, 0).contiguous()
        out = x0.new_empty((self.size * x0.shape[0], *x0.shape[1:]))
        volume = (self.size - 1) * _nbytes(x)
        return self._run(
            "all_gather",
            lambda: all_gather_into(out, x0, group=self.group, async_op=True),
            lambda: out.movedim(0, dim),
            volume,
            volume,
            async_op,
        )

    def reduce_scatter(
        self,
        x: torch.Tensor,
        dim: int = 0,
        *,
        op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
        async_op: bool = False,
    ) -> torch.Tensor | CommHandle:
        """Reduce ``x`` over ranks and keep this rank's ``1/P`` part of ``dim`` (the inverse of all_gather)."""
        dim = dim % x.dim()
        if x.shape[dim] % self.size:
            raise ValueError(
                f"reduce_scatter needs dim {dim} divisible by the group size: shape={tuple(x.shape)}, size={self.size}"
            )
        if self.size == 1:
            return self._run("reduce_scatter", lambda: None, lambda: x, 0, 0, async_op)
        x0 = x.movedim(dim, 0).contiguous()
        out = x0.new_empty((x0.shape[0] // self.size, *x0.shape[1:]))
        volume = (self.size - 1) * _nbytes(out)
        return self._run(
            "reduce_scatter",
            lambda: reduce_scatter_into(out, x0, op=op, group=self.group, async_op=True),
            lambda: out.movedim(0, dim),
            volume,
            volume,
            async_op,
        )

    def all_reduce(
        self,
        x: torch.Tensor,
        *,
        op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
        inplace: bool = False,
        async_op: bool = False,
    ) -> torch.Tensor | CommHandle:
        """Reduce ``x`` over ranks; returns a new tensor unless ``inplace``."""
        if self.size == 1:
            return self._run("all_reduce", lambda: None, lambda: x, 0, 0, async_op)
        out = x if inplace else x.clone()
        if not out.is_contiguous():
            raise ValueError("all_reduce(inplace=True) needs a contiguous tensor")
        volume = 2 * (self.size - 1) * math.ceil(x.numel() / self.size) * x.element_size()
        return self._run(
            "all_reduce",
            lambda: dist.all_reduce(out, op=op, group=self.group, async_op=True),
            lambda: out,
            volume,
            volume,
            async_op,
        )

    def all_to_all(
        self, x: torch.Tensor, scatter_dim: int, gather_dim: int, *, async_op: bool = False
    ) -> torch.Tensor | CommHandle:
        """Split ``x`` into ``P`` parts along ``scatter_dim``, send part ``j`` to rank ``j``, and concatenate
        the parts received along ``gather_dim`` in rank order.

        Sequence -> head resharding of ``[B, T/P, H, D]`` is ``all_to_all(x, scatter_dim=2, gather_dim=1)``
        giving ``[B, T, H/P, D]``; its inverse swaps the two dims.
        """
        scatter_dim, gather_dim = scatter_dim % x.dim(), gather_dim % x.dim()
        if x.shape[scatter_dim] % self.size:
            raise ValueError(
                f"all_to_all needs scatter dim {scatter_dim} divisible by the group size: "
                f"shape={tuple(x.shape)}, size={self.size}"
            )
        if self.size == 1:
            return self._run("all_to_all", lambda: None, lambda: x, 0, 0, async_op)
        send = torch.stack(x.chunk(self.size, dim=scatter_dim))  # [P, *part]
        recv = torch.empty_like(send)
        volume = (self.size - 1) * _nbytes(send[0])
        return self._run(
            "all_to_all",
            lambda: dist.all_to_all_single(recv, send, group=self.group, async_op=True),
            lambda: torch.cat(recv.unbind(0), dim=gather_dim),
            volume,
            volume,
            async_op,
        )

    def all_to_all_stacked(self, parts: torch.Tensor, *, async_op: bool = False) -> torch.Tensor | CommHandle:
        """Send ``parts[j]`` to rank ``j`` and return ``received`` with ``received[j]`` from rank ``j``.

        ``parts`` is ``[P, ...]``, contiguous (the caller packs it, e.g. q, k and v in one buffer, so the
        exchange moves them in one collective with no copy here). Counted under ``all_to_all``.
        """
        if parts.shape[0] != self.size:
            raise ValueError(f"all_to_all_stacked needs {self.size} parts along dim 0, got shape {tuple(parts.shape)}")
        if self.size == 1:
            return self._run("all_to_all", lambda: None, lambda: parts, 0, 0, async_op)
        send = parts.contiguous()
        recv = torch.empty_like(send)
        volume = (self.size - 1) * _nbytes(send[0])
        return self._run(
            "all_to_all",
            lambda: dist.all_to_all_single(recv, send, group=self.group, async_op=True),
            lambda: recv,
            volume,
            volume,
            async_op,
        )

    def all_to_all_v(
        self, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Uneven all-to-all along dim 0: rows ``[sum(send_splits[:j]), +send_splits[j])`` go to rank ``j``.

        Returns the received rows (rank order) and ``recv_splits``. When ``recv_splits`` is not given the
        counts are exchanged first (one small all-to-all, counted under ``all_to_all``). Used for MoE token
        dispatch, where every rank sends a different number of tokens to each expert rank.
        """
        send_splits = [int(n) for n in send_splits]
        if len(send_splits) != self.size or sum(send_splits) != x.shape[0] or min(send_splits) < 0:
            raise ValueError(
                f"all_to_all_v needs {self.size} non-negative send splits summing to {x.shape[0]} rows, "
                f"got {send_splits}"
            )
        if recv_splits is None:
            # on x's device: NCCL moves CUDA tensors only (reading the counts back is the one host sync)
            counts = torch.tensor(send_splits, dtype=torch.int64, device=x.device)
            recv_splits = self.all_to_all(counts, 0, 0).tolist()
        recv_splits = [int(n) for n in recv_splits]
        row = x[0].numel() * x.element_size() if x.shape[0] else math.prod(x.shape[1:]) * x.element_size()
        sent = (sum(send_splits) - send_splits[self.rank]) * row
        received = (sum(recv_splits) - recv_splits[self.rank]) * row
        if self.size == 1:
            return self._run("all_to_all_v", lambda: None, lambda: x, 0, 0, False), recv_splits
        send = x.contiguous()
        out = send.new_empty((sum(recv_splits), *send.shape[1:]))
        result = self._run(
            "all_to_all_v",
            lambda: dist.all_to_all_single(
                out,
                send,
                output_split_sizes=recv_splits,
                input_split_sizes=send_splits,
                group=self.group,
                async_op=True,
            ),
            lambda: out,
            sent,
            received,
            False,
        )
        return result, recv_splits

    def send_recv(
        self,
        tensors: torch.Tensor | Sequence[torch.Tensor],
        shift: int = 1,
        *,
        recv_buffers: Sequence[torch.Tensor] | None = None,
        tag: int = 0,
        send: bool = True,
        recv: bool = True,
    ) -> P2PExchange:
        """Prepare sending ``tensors`` to ``rank + shift`` and receiving the same shapes from
        ``rank - shift``. Call ``.commit()`` to start and ``.wait()`` for the received list.

        Every rank of the group must build matching exchanges (same shift, shapes and ``tag``) in the same
        order. ``send=False`` / ``recv=False`` drop one side (``wait()`` then returns ``[]`` when nothing is
        received); the peer must drop the matching side.
        """
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        return P2PExchange(self, list(tensors), shift, recv_buffers, tag, send, recv)

    def send(self, tensors: torch.Tensor | Sequence[torch.Tensor], dst: int) -> None:
        """Blocking send to group rank ``dst`` (for serial schedules such as LASP-1's state chain)."""
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        self._check_peer(dst)
        self.stats.record("send", sum(_nbytes(t) for t in tensors), 0)
        with nvtx_range(f"distseq.send[{self.name}]"):
            for t in tensors:
                self._p2p_wait(dist.isend(t.contiguous(), self.ranks[dst], self.group), f"send(dst={dst})")

    def recv(self, like: torch.Tensor | Sequence[torch.Tensor], src: int) -> list[torch.Tensor]:
        """Blocking receive from group rank ``src`` of tensors shaped like ``like``."""
        like = [like] if isinstance(like, torch.Tensor) else list(like)
        self._check_peer(src)
        out = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]
        self.stats.record("recv", 0, sum(_nbytes(t) for t in out))
        with nvtx_range(f"distseq.recv[{self.name}]"):
            for t in out:
                self._p2p_wait(dist.irecv(t, self.ranks[src], self.group), f"recv(src={src})")
        return out

    def _check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.size or peer == self.rank:
            raise ValueError(f"peer must be another rank of group {self.name!r} (size {self.size}), got {peer}")

    def _p2p_wait(self, work: dist.Work, call: str) -> None:
        try:
            work.wait()
        except Exception as err:
            raise CommunicationError(f"{self._describe(call)} failed: {err}") from err

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)

    def split(self, rank_groups: Sequence[Sequence[int]], *, name: str | None = None) -> Communicator:
        """Partition this group into sub-groups and return the one holding this rank.

        ``rank_groups`` lists group-local ranks and must cover ``0 .. size-1`` exactly once. Collective over
        the *world* (SPMD): every rank of the job calls ``split`` at the same point, each on its own parent
        group (the sp group of each tp coordinate, say). The partitions of all parents are gathered, so every
        rank creates every sub-group, in one order, as ``new_group`` requires.
        """
        flat = sorted(r for g in rank_groups for r in g)
        if flat != list(range(self.size)) or any(len(g) == 0 for g in rank_groups):
            raise ValueError(
                f"split needs a partition of ranks 0..{self.size - 1} of group {self.name!r}, got {rank_groups}"
            )
        sub_name = name or f"{self.name}.split"
        if self.group is None:
            return Communicator(name=sub_name)
        partition = [[self.ranks[r] for r in g] for g in rank_groups]  # global ranks
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, partition)
        groups = sorted({tuple(g) for part in every for g in part})
        me, mine = dist.get_rank(), None
        for members in groups:
            pg = dist.new_group(list(members))
            if me in members:
                mine = Communicator(pg, name=sub_name)
        assert mine is not None
        return mine

    def split_grid(self, inner_size: int) -> tuple[Communicator, Communicator]:
        """Split into an inner grid axis of consecutive ranks and an outer axis of strided ranks.

        With size 4 and ``inner_size=2`` the inner groups are {0,1}, {2,3} and the outer groups {0,2},
        {1,3}. Returns ``(inner, outer)``; used by 2D schemes such as Ulysses x Ring.
        """
        if inner_size < 1 or self.size % inner_size:
            raise ValueError(
                f"split_grid needs inner_size dividing the group size: inner_size={inner_size}, size={self.size}"
            )
        outer_size = self.size // inner_size
        inner = self.split(
            [[o * inner_size + i for i in range(inner_size)] for o in range(outer_size)],
            name=f"{self.name}.inner",
        )
        outer = self.split(
            [[o * inner_size + i for o in range(outer_size)] for i in range(inner_size)],
            name=f"{self.name}.outer",
        )
        return inner, outer
