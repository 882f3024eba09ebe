"""The sequence-parallel short causal convolution equals ``torch.nn.functional.conv1d`` run on each whole
document of the unsharded sequence, forward and backward (input, weight, bias), for both layouts, with and
without packed documents (documents crossing ranks, one shorter than the filter), at sp = 1, 2, 4; and its
bytes are the documented ``(P - 1) chunks (W - 1) B C s`` each way. Tolerance: fp64, 1e-12 relative.
"""

from __future__ import annotations

import pytest
import torch

from distseq import causal_conv1d
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.conv import causal_conv
from distseq.testing.sync import no_host_sync

SEQ_PER_RANK = 12
DOCS = {1: [0, 2, 9, 12], 2: [0, 5, 6, 17, 24], 4: [0, 1, 13, 14, 30, 40, 48]}


def _reference(x, weight, bias, doc_offsets):
    """conv1d per document, each padded on the left with W - 1 zeros and cut to its length."""
    width = weight.shape[1]
    bounds = doc_offsets or [0, x.shape[1]]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        piece = x[:, start:end].transpose(1, 2)  # [B, C, T]
        out = torch.nn.functional.conv1d(piece, weight[:, None], bias, padding=width - 1, groups=x.shape[2])
        outs.append(out[..., : end - start].transpose(1, 2))
    return torch.cat(outs, dim=1)


def _inputs(seq_len, channels=6, width=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, seq_len, channels, generator=g, dtype=torch.float64)
    weight = torch.randn(channels, width, generator=g, dtype=torch.float64)
    bias = torch.randn(channels, generator=g, dtype=torch.float64)
    dout = torch.randn(2, seq_len, channels, generator=g, dtype=torch.float64)
    return x, weight, bias, dout


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def job_parity(kind, documents, width):
    comm = Communicator().view("conv")
    p, r = comm.size, comm.rank
    seq_len = SEQ_PER_RANK * p
    docs = DOCS[p] if documents else None
    layout = SequenceLayout(kind, seq_len, p, r)
    x, weight, bias, dout = _inputs(seq_len, width=width)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    want = _reference(*leaves, docs)
    want.backward(dout)
    local = layout.shard(x, 1).requires_grad_()
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    with no_host_sync():
        out = causal_conv1d(local, w, b, comm=comm, layout=layout, cu_seqlens=docs)
        out.backward(layout.shard(dout, 1))
    sent = comm.stats.bytes_sent
    assert _rel(out, layout.shard(want, 1)) < 1e-12
    assert _rel(local.grad, layout.shard(leaves[0].grad, 1)) < 1e-12
    # Weight and bias gradients are this rank's partial sums; summed over ranks they are the reference's.
    grads = comm.all_reduce(torch.cat([w.grad.flatten(), b.grad]))
    assert _rel(grads, torch.cat([leaves[1].grad.flatten(), leaves[2].grad])) < 1e-12
    # One tail of W - 1 tokens (B C s bytes each) per boundary between ranks: forward to the next chunk's owner,
    # backward (its gradient) from there; this rank sends once per own chunk whose neighbour another rank holds.
    owner = {c: j for j in range(p) for c in layout.chunk_indices_of(j)}
    mine = layout.chunk_indices_of(r)
    crossing = sum(c + 1 < layout.num_chunks and owner[c + 1] != r for c in mine)
    crossing += sum(c > 0 and owner[c - 1] != r for c in mine)
    return sent, crossing * (width - 1) * 2 * 6 * 8 if width > 1 else 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("documents", [False, True])
def test_equals_conv1d_per_document(worlds, world_size, kind, documents):
    for sent, expected in worlds(world_size).run(job_parity, kind, documents, 4):
        assert sent == expected, (sent, expected)  # tails forward, their gradients backward, exactly


@pytest.mark.timeout(120)
def test_widths_one_to_three(worlds):
    for width in (1, 2, 3):
        worlds(2).run(job_parity, "zigzag", True, width)


def test_errors_name_the_values():
    layout = SequenceLayout("zigzag", 8, 2, 0)
    x = torch.zeros(1, 4, 3)
    with pytest.raises(ValueError, match=r"needs chunks of at least 3 tokens.*chunks have 2"):
        causal_conv(x, torch.zeros(3, 4), layout, _FakeComm(2))
    with pytest.raises(ValueError, match=r"weight \[C, W\] with C=3"):
        causal_conv(x, torch.zeros(5, 4), layout, _FakeComm(2))
    with pytest.raises(ValueError, match=r"expects 4 local tokens.*got 5"):
        causal_conv(torch.zeros(1, 5, 3), torch.zeros(3, 2), layout, _FakeComm(2))
    with pytest.raises(ValueError, match=r"communicator of size sp=2, got 1"):
        causal_conv(x, torch.zeros(3, 2), layout, _FakeComm(1))


class _FakeComm:
    """Only a size: the checks run before any collective."""

    def __init__(self, size):
        self.size = size
