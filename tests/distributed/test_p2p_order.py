"""Point-to-point order: NCCL ignores tags and matches each (sender, receiver) pair's messages in the order they
are posted, so every strategy that uses point-to-point exchanges must post matching sends and receives in the same
order on both ends, whatever their tags.

Two checks per strategy, forward and backward, both layouts, sp = 4: (1) with every tag replaced by 0 (as NCCL
sees them) the results are bitwise those with tags; (2) the (peer, bytes) sequence of every rank's sends to each
peer equals that peer's receives from it, position by position.
"""

from __future__ import annotations

import pytest
import torch

from distseq.parallel import comm as comm_module
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import make_strategy

#: strategies with point-to-point exchanges, and the call that runs them
P2P_STRATEGIES = {
    "ring": "attention",
    "token_ring": "attention",
    "usp": "attention",
    "lasp1": "linear_attention",
    "allscan": "linear_attention",
    "allscan delta": "delta_rule",
    "conv": "causal_conv1d",  # the short convolutions' halos
}


def _run(name: str, kind: str) -> list[torch.Tensor]:
    comm = Communicator()
    p, r = comm.size, comm.rank
    seq_len = 16 * p
    layout = SequenceLayout(kind, seq_len, p, r, [0, 5, 21, seq_len])
    if name == "conv":
        return _run_conv(kind)
    strategy_name = name.split()[0]
    options = {"ulysses_degree": 2} if name == "usp" else ({"block": 3} if name.startswith("allscan") else {})
    if strategy_name in ("lasp1", "allscan"):
        options["chunk_size"] = 4
    strategy = make_strategy(strategy_name, comm, layout, **options)
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(2, seq_len, 4, 8, generator=g, dtype=torch.float64) for _ in range(4)]
    full[1] = torch.nn.functional.normalize(full[1], dim=-1)
    beta = torch.rand(2, seq_len, 4, generator=g, dtype=torch.float64)
    q, k, v, dout = (layout.shard(t, 1) for t in full)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    call = P2P_STRATEGIES[name]
    if call == "attention":
        out = strategy.attention(*leaves, causal=True)
    elif call == "linear_attention":
        out = strategy.linear_attention(*leaves, gate=torch.full(q.shape[:3], -0.1, dtype=torch.float64))
    else:
        out = strategy.delta_rule(*leaves, layout.shard(beta, 1))
    out.backward(dout)
    return [out.detach(), *(t.grad for t in leaves)]


def _run_conv(kind: str) -> list[torch.Tensor]:
    from distseq import causal_conv1d

    comm = Communicator()
    p, r = comm.size, comm.rank
    seq_len = 16 * p
    layout = SequenceLayout(kind, seq_len, p, r)
    g = torch.Generator().manual_seed(0)
    x, dout = (layout.shard(torch.randn(2, seq_len, 6, generator=g, dtype=torch.float64), 1) for _ in range(2))
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_()
    x = x.clone().requires_grad_()
    out = causal_conv1d(x, weight, comm=comm, layout=layout, cu_seqlens=[0, 5, 21, seq_len])
    out.backward(dout)
    return [out.detach(), x.grad, weight.grad]


def job_tag_free(name: str, kind: str) -> bool:
    with_tags = _run(name, kind)
    original = comm_module.P2PExchange.commit

    def commit_without_tags(self):
        self._tag = 0  # what NCCL matches on: nothing but the order
        return original(self)

    comm_module.P2PExchange.commit = commit_without_tags
    try:
        without = _run(name, kind)
    finally:
        comm_module.P2PExchange.commit = original
    return all(torch.equal(a, b) for a, b in zip(with_tags, without, strict=True))


def job_order(name: str, kind: str) -> tuple[list, list]:
    """This rank's posted sends [(dst, bytes)] and receives [(src, bytes)], in posting order (global ranks), from
    every point-to-point path of the Communicator: batched exchanges and the blocking send / recv."""
    sends, recvs = [], []
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    exchange_commit = comm_module.P2PExchange.commit
    blocking_send, blocking_recv = Communicator.send, Communicator.recv

    def commit(self):
        comm = self._comm
        if not self._local:
            dst = comm.ranks[(comm.rank + self._shift) % comm.size]
            src = comm.ranks[(comm.rank - self._shift) % comm.size]
            sends.extend((dst, nbytes(t)) for t in self._send)
            recvs.extend((src, nbytes(t)) for t in self._recv)
        return exchange_commit(self)

    def send(self, tensors, dst):
        for t in [tensors] if isinstance(tensors, torch.Tensor) else tensors:
            sends.append((self.ranks[dst], nbytes(t)))
        return blocking_send(self, tensors, dst)

    def recv(self, like, src):
        for t in [like] if isinstance(like, torch.Tensor) else like:
            recvs.append((self.ranks[src], nbytes(t)))
        return blocking_recv(self, like, src)

    comm_module.P2PExchange.commit, Communicator.send, Communicator.recv = commit, send, recv
    try:
        _run(name, kind)
    finally:
        comm_module.P2PExchange.commit = exchange_commit
        Communicator.send, Communicator.recv = blocking_send, blocking_recv
    return sends, recvs


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("name", list(P2P_STRATEGIES))
def test_results_do_not_depend_on_tags(worlds, name, kind):
    assert all(worlds(4).run(job_tag_free, name, kind, timeout=120))


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("name", list(P2P_STRATEGIES))
def test_every_send_meets_its_receive_in_order(worlds, name, kind):
    logs = worlds(4).run(job_order, name, kind, timeout=120)
    for a, (sends, _) in enumerate(logs):
        for b, (_, recvs) in enumerate(logs):
            sent = [size for dst, size in sends if dst == b]
            received = [size for src, size in recvs if src == a]
            assert sent == received, (name, kind, a, b, sent, received)
    assert any(sends for sends, _ in logs), "the strategy exchanged nothing point to point"
