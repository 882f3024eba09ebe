"""Local attention backends: one contract for the fused kernels and the reference.

A strategy cuts its queries and keys into spans on the host (at chunk, tile and document boundaries) so that
every (query span, key span) pair it hands to a kernel is one of two kinds:

* ``BlockKind.FULL``: every query attends every key;
* ``BlockKind.CAUSAL``: queries and keys are the same run of positions, query ``i`` attends keys ``<= i``.

The contract, with ``q`` ``[B, Tq, H, D]`` and ``k``, ``v`` ``[B, Tk, Hkv, D]`` (GQA: ``H`` divisible by ``Hkv``)::

    out, lse = backend.forward(q, k, v, kind, scale)          # out [B, Tq, H, D], lse [B, H, Tq] fp32 (fp64)
    dq, dk, dv = backend.backward(dout, q, k, v, out, lse, kind, scale, delta=None)

``out`` and ``lse`` given to ``backward`` may be the *merged* ones of the whole attention (after combining
every key block), which is what ring schedules need: the block's gradients then sum over blocks to the full
gradients. ``delta = rowsum(dout * out)`` ``[B, H, Tq]`` may be given instead of ``out`` (``out=None``), so a
strategy can ship ``h`` numbers per token instead of ``out``. Returned tensors may be in the compute dtype of
the backend; callers accumulate them in fp32. No backend reads a device value back to the host.

Backends:

* ``sdpa``: torch's fused flash kernels that return the log-sum-exp. On CPU
  ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward (any float dtype, GQA native; bf16
  and fp16 blocks are computed in fp32, which costs no time on CPUs without bf16 matrix units and keeps
  merged results as exact as one fused call). On CUDA ``aten._flash_attention_forward`` / ``_backward``
  (fp16 and bf16, head_dim <= 256, GQA native).
* ``flash_attn``: the flash-attn package (2.6 or later) when installed, CUDA, fp16/bf16.
* ``reference``: plain PyTorch that materialises the block's scores (the test oracle, and the fp64 path).
* ``auto``: the fastest that serves the device and dtype (see :func:`select_attention_backend`).

A backend asked for by name that cannot serve an input raises ValueError naming why; there is no silent
fallback.
"""

from __future__ import annotations

import abc
import functools
import importlib.util
from dataclasses import dataclass
from typing import ClassVar

import torch

from distseq.kernels._dtypes import accumulation_dtype
from distseq.kernels.attention.mask import BlockKind
from distseq.kernels.attention.naive import attention_delta, causal_mask, masked_attention, masked_attention_backward

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "VarlenPieces",
    "attention_backend",
    "select_attention_backend",
]

_HALF = (torch.float16, torch.bfloat16)


class AttentionBackend(abc.ABC):
    """A local attention kernel over one (query span, key span) pair of kind FULL or CAUSAL."""

    name: ClassVar[str]
    #: longest span the backend should get; longer chunks are tiled by the caller (None: any length)
    max_span: ClassVar[int | None] = None
    #: whether the backward reads ``delta`` (else ``out``; the other may be None)
    uses_delta: ClassVar[bool] = False

    @abc.abstractmethod
    def unavailable(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        """Why this backend cannot serve ``(device, dtype, head_dim)``, or None when it can."""

    def check(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
        reason = self.unavailable(device, dtype, head_dim)
        if reason is not None:
            raise ValueError(
                f"attention backend {self.name!r} cannot serve {dtype} on {device.type} (head_dim={head_dim}): {reason}"
            )

    @abc.abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: BlockKind, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [B, Tq, H, D], lse [B, H, Tq] fp32, fp64 for fp64)`` of one block."""

    @abc.abstractmethod
    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor | None,
        lse: torch.Tensor,
        kind: BlockKind,
        scale: float,
        delta: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dq, dk, dv)`` of one block given the final ``out`` (or ``delta``) and ``lse``."""

    def varlen(self, device: torch.device) -> bool:
        """Whether :meth:`forward_varlen` / :meth:`backward_varlen` serve ``device``."""
        return False

    def forward_varlen(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pieces: VarlenPieces, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Many blocks in one call (flash attention's varlen entry): ``q`` ``[Tq, H, D]`` and ``k``, ``v``
        ``[Tk, Hkv, D]`` hold the pieces back to back; piece ``i`` of ``q`` attends piece ``i`` of ``k``, all of
        one kind. Returns ``out`` ``[Tq, H, D]`` and ``lse`` ``[H, Tq]`` fp32."""
        raise RuntimeError(f"attention backend {self.name!r} has no varlen entry")

    def backward_varlen(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor | None,
        lse: torch.Tensor,
        pieces: VarlenPieces,
        causal: bool,
        scale: float,
        delta: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of :meth:`forward_varlen`'s blocks given the final ``out`` ``[Tq, H, D]`` (or ``delta``
        ``[H, Tq]``) and ``lse`` ``[H, Tq]``."""
        raise RuntimeError(f"attention backend {self.name!r} has no varlen entry")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(frozen=True)
class VarlenPieces:
    """Piece boundaries of a varlen call: ``cu_q``, ``cu_k`` int32 ``[num_pieces + 1]`` on the device (built
    from host integers, so no synchronisation) and the longest piece of each side."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def _out_with_delta(dout: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A stand-in ``out`` with ``rowsum(dout * out) == delta`` for kernels that take ``out`` (they only use
    it for that row sum): ``dout * delta / |dout|^2`` row by row, 0 where ``dout`` is 0 (and so is delta)."""
    dtype = delta.dtype
    norm = dout.to(dtype).square().sum(-1)  # [B, T, H]
    factor = torch.where(norm > 0, delta.transpose(1, 2) / torch.where(norm > 0, norm, 1.0), 0.0)
    return dout.to(dtype) * factor[..., None]


def _varlen_out(dout: torch.Tensor, out: torch.Tensor | None, delta: torch.Tensor | None) -> torch.Tensor:
    """``out`` ``[T, H, D]``, or its stand-in from ``delta`` ``[H, T]`` (see :func:`_out_with_delta`)."""
    return out if out is not None else _out_with_delta(dout[None], delta[None])[0]


class ReferenceBackend(AttentionBackend):
    """Plain PyTorch; materialises ``[B, H, Tq, Tk]`` scores, so spans are tiled to ``max_span``."""

    name = "reference"
    max_span = 2048
    uses_delta = True

    def unavailable(self, device, dtype, head_dim):
        return None if dtype.is_floating_point else "needs a floating dtype"

    def forward(self, q, k, v, kind, scale):
        mask = causal_mask(q.shape[1], q.device) if kind is BlockKind.CAUSAL else None
        return masked_attention(q, k, v, mask, scale)

    def backward(self, dout, q, k, v, out, lse, kind, scale, delta=None):
        mask = causal_mask(q.shape[1], q.device) if kind is BlockKind.CAUSAL else None
        delta = attention_delta(dout, out) if delta is None else delta
        return masked_attention_backward(dout, q, k, v, lse, delta, mask, scale)


class SDPABackend(AttentionBackend):
    """torch's fused flash-attention ops (no extra package)."""

    name = "sdpa"

    def unavailable(self, device, dtype, head_dim):
        if device.type == "cpu":
            return None if dtype.is_floating_point else "needs a floating dtype"
        if device.type == "cuda":
            if dtype not in _HALF:
                return "torch's CUDA flash kernel takes fp16/bf16 only; use 'reference' for fp32/fp64"
            if head_dim > 256 or head_dim % 8:
                return "torch's CUDA flash kernel needs head_dim <= 256 and divisible by 8"
            return None
        return f"no fused attention op for device type {device.type!r}"

    def forward(self, q, k, v, kind, scale):
        causal = kind is BlockKind.CAUSAL
        if q.device.type == "cuda":
            return _cuda_flash_forward(q, k, v, None, None, q.shape[1], k.shape[1], causal, scale)
        q, k, v = (_cpu_compute(x) for x in (q, k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale
        )
        return out.transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse, kind, scale, delta=None):
        causal = kind is BlockKind.CAUSAL
        if out is None:
            out = _out_with_delta(dout, delta)
        if q.device.type == "cuda":
            return _cuda_flash_backward(dout, q, k, v, out, lse, None, None, q.shape[1], k.shape[1], causal, scale)
        dout, q, k, v, out = (_cpu_compute(x) for x in (dout, q, k, v, out))
        dout, out, lse = dout.to(q.dtype), out.to(q.dtype), lse.to(accumulation_dtype(q.dtype))
        if causal and q.shape[1] >= 2 * _CPU_CAUSAL_TILE:
            return _cpu_causal_backward_tiled(dout, q, k, v, out, lse, scale)
        return _cpu_flash_backward(dout, q, k, v, out, lse, causal, scale)

    def varlen(self, device):
        return device.type == "cuda"

    def forward_varlen(self, q, k, v, pieces, causal, scale):
        return _cuda_flash_forward(q, k, v, pieces.cu_q, pieces.cu_k, pieces.max_q, pieces.max_k, causal, scale)

    def backward_varlen(self, dout, q, k, v, out, lse, pieces, causal, scale, delta=None):
        out = _varlen_out(dout, out, delta)
        return _cuda_flash_backward(
            dout, q, k, v, out, lse, pieces.cu_q, pieces.cu_k, pieces.max_q, pieces.max_k, causal, scale
        )


def _cuda_flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """torch's CUDA flash kernel: dense (``[B, T, H, D]``, no offsets) or varlen (``[T, H, D]`` and offsets)."""
    q, k, v = (_unit_stride(x) for x in (q, k, v))
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale
    )
    return out, lse


def _cuda_flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    """The backward of :func:`_cuda_flash_forward` given the final ``out`` and ``lse``."""
    q, k, v = (_unit_stride(x) for x in (q, k, v))
    return torch.ops.aten._flash_attention_backward(
        _unit_stride(dout.to(q.dtype)),
        q,
        k,
        v,
        _unit_stride(out.to(q.dtype)),
        lse.float().contiguous(),
        cu_q,
        cu_k,
        max_q,
        max_k,
        0.0,
        causal,
        torch.zeros(2, dtype=torch.uint64, device=q.device),  # no dropout: the RNG state is never read
        torch.empty(0, device=q.device),
        scale=scale,
    )


def _cpu_flash_backward(dout, q, k, v, out, lse, causal, scale):
    """One call of torch's CPU flash backward on ``[B, T, H, D]`` tensors of one compute dtype."""
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2),
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        out.transpose(1, 2),
        lse,
        0.0,
        causal,
        scale=scale,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# torch's CPU flash kernels walk keys in blocks of 512 and queries in blocks of 256 (64 below 768 queries, 32
# below 192), and compute in full every key block a query block reaches, masking afterwards: a causal call pays
# for up to a 512-wide block past the diagonal on every query block, and below 768 tokens for the whole square.
# The backward therefore cuts a causal call into diagonal tiles of _CPU_CAUSAL_TILE tokens and the full
# rectangles below them (halving recursively; rectangles cut into squares of at most _CPU_CAUSAL_SIDE tokens, so
# a piece's gradients stay small beside the whole), at the price of a few gradient additions. Measured with one
# thread against one call: 0.70x the time at 512 tokens, 0.85x at 1K, 0.92x at 2K, 0.95x at 4K, 0.97x at 8K,
# the same from 16K on. The forward would have to merge its pieces' outputs, which costs more than it saves
# from 1K tokens on, so it stays one call.
_CPU_CAUSAL_TILE = 128
_CPU_CAUSAL_SIDE = 2048


@functools.lru_cache(maxsize=256)
def causal_tiles(length: int, tile: int, side: int) -> tuple[tuple[int, int, int, int, bool], ...]:
    """``(q0, q1, k0, k1, causal)`` pieces that cover the causal square ``[0, length)`` once: causal squares of
    at most ``tile`` tokens on the diagonal, full rectangles (queries after their keys) of at most ``side``
    tokens a side below them."""
    if length <= tile:
        return ((0, length, 0, length, True),)
    half = length // 2 if length < 2 * tile else (length // 2 // tile) * tile
    below = tuple(
        (q0, min(q0 + side, length), k0, min(k0 + side, half), False)
        for q0 in range(half, length, side)
        for k0 in range(0, half, side)
    )
    high = tuple(
        (q0 + half, q1 + half, k0 + half, k1 + half, c) for q0, q1, k0, k1, c in causal_tiles(length - half, tile, side)
    )
    return (*causal_tiles(half, tile, side), *below, *high)


def _cpu_causal_backward_tiled(dout, q, k, v, out, lse, scale):
    """The causal backward as the pieces of :func:`causal_tiles`, each a call of the flash backward with the
    rows' ``out`` and ``lse`` (pieces over disjoint keys: their gradients add up to the whole)."""
    grads = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q0, q1, k0, k1, causal in causal_tiles(q.shape[1], _CPU_CAUSAL_TILE, _CPU_CAUSAL_SIDE):
        rows, keys = slice(q0, q1), slice(k0, k1)
        piece = _cpu_flash_backward(
            dout[:, rows], q[:, rows], k[:, keys], v[:, keys], out[:, rows], lse[:, :, rows], causal, scale
        )
        for total, part, span in zip(grads, piece, (rows, keys, keys), strict=True):
            total[:, span] += part
    return grads


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a contiguous last dimension. The fused kernels index the head dimension as if its stride were
    1 whatever the tensor says (torch's CPU flash op reads garbage otherwise; ``F.scaled_dot_product_attention``
    checks this before it picks a kernel, calling the op directly does not)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _cpu_compute(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 blocks in fp32: the CPU flash kernel accumulates in fp32 anyway, and a merged result stays
    # as exact as one fused call over the whole sequence (partial outputs are not rounded to 16 bits).
    return _unit_stride(x.float() if x.dtype in _HALF else x)


class FlashAttnBackend(AttentionBackend):
    """flash-attn 2.x (``flash_attn.flash_attn_interface``), imported on first use."""

    name = "flash_attn"

    def unavailable(self, device, dtype, head_dim):
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash-attn package is not installed"
        if device.type != "cuda":
            return "flash-attn runs on CUDA devices only"
        if dtype not in _HALF:
            return "flash-attn takes fp16/bf16 only"
        if head_dim > 256:
            return "flash-attn needs head_dim <= 256"
        return None

    @staticmethod
    @functools.cache
    def _interface():
        from flash_attn import flash_attn_interface

        return flash_attn_interface

    def forward(self, q, k, v, kind, scale):
        fa = self._interface()
        q, k, v = (_unit_stride(x) for x in (q, k, v))
        out, lse, *_ = fa._flash_attn_forward(
            q, k, v, 0.0, scale, causal=kind is BlockKind.CAUSAL, **_plain_args(fa._flash_attn_forward)
        )
        return out, lse

    def backward(self, dout, q, k, v, out, lse, kind, scale, delta=None):
        fa = self._interface()
        if out is None:
            out = _out_with_delta(dout, delta)
        q, k, v = (_unit_stride(x) for x in (q, k, v))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        fa._flash_attn_backward(
            dout.to(q.dtype).contiguous(),
            q,
            k,
            v,
            out.to(q.dtype).contiguous(),
            lse.float().contiguous(),
            dq,
            dk,
            dv,
            0.0,
            scale,
            kind is BlockKind.CAUSAL,
            **_plain_args(fa._flash_attn_backward),
        )
        return dq, dk, dv

    def varlen(self, device):
        return device.type == "cuda"

    def forward_varlen(self, q, k, v, pieces, causal, scale):
        fa = self._interface()
        q, k, v = (_unit_stride(x) for x in (q, k, v))
        out, lse, *_ = fa._flash_attn_varlen_forward(
            q, k, v, pieces.cu_q, pieces.cu_k, pieces.max_q, pieces.max_k, 0.0, scale, causal=causal,
            **_plain_args(fa._flash_attn_varlen_forward),
        )  # fmt: skip
        return out, lse

    def backward_varlen(self, dout, q, k, v, out, lse, pieces, causal, scale, delta=None):
        fa = self._interface()
        out = _varlen_out(dout, out, delta)
        q, k, v = (_unit_stride(x) for x in (q, k, v))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        fa._flash_attn_varlen_backward(
            dout.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(), lse.float().contiguous(),
            dq, dk, dv, pieces.cu_q, pieces.cu_k, pieces.max_q, pieces.max_k, 0.0, scale, causal,
            **_plain_args(fa._flash_attn_varlen_backward),
        )  # fmt: skip
        return dq, dk, dv


@functools.cache
def _plain_args(fn) -> dict:
    """The keyword arguments flash-attn's entry points (2.6 and later) take besides the tensors, for plain
    attention: no window, no softcap, no ALiBi, no dropout state."""
    import inspect

    names = inspect.signature(fn).parameters
    args = {
        "alibi_slopes": None,
        "softcap": 0.0,
        "window_size_left": -1,
        "window_size_right": -1,
        "return_softmax": False,
        "deterministic": False,
        "rng_state": None,
    }
    if "window_size" in names:
        args["window_size"] = (-1, -1)
    return {name: value for name, value in args.items() if name in names}


#: name -> backend instance (backends are stateless)
ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    b.name: b for b in (SDPABackend(), FlashAttnBackend(), ReferenceBackend())
}


def select_attention_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> AttentionBackend:
    """The ``auto`` choice: flash-attn, then torch's fused kernels, for the devices and dtypes they serve;
    fp64 (and anything else) runs the reference."""
    if dtype == torch.float64:
        return ATTENTION_BACKENDS["reference"]
    for name in ("flash_attn", "sdpa"):
        if ATTENTION_BACKENDS[name].unavailable(device, dtype, head_dim) is None:
            return ATTENTION_BACKENDS[name]
    return ATTENTION_BACKENDS["reference"]


def attention_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> AttentionBackend:
    """The backend ``name`` (or the ``auto`` choice) for inputs on ``device`` of ``dtype``; ValueError when
    a backend asked for by name cannot serve them."""
    if name == "auto":
        return select_attention_backend(device, dtype, head_dim)
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {['auto', *ATTENTION_BACKENDS]}")
    backend = ATTENTION_BACKENDS[name]
    backend.check(device, dtype, head_dim)
    return backend
