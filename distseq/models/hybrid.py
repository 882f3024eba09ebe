"""The hybrid MoE language model: linear-attention, softmax-attention, Mamba2 and gated DeltaNet layers.

The model file shows the architecture only; parallel plans (tensor, expert, data) are applied to a built
model from ``distseq.parallel``. Sequence parallelism enters through the
:class:`~distseq.parallel.sequence.context.SequenceParallel` passed to ``forward``.

Loss convention: ``forward`` returns this rank's share of the global loss, ``sum(token losses) /
loss_normalizer + sum(aux) / aux_normalizer``, where ``loss_normalizer`` is the number of target tokens in the
whole global batch (all data- and sequence-parallel ranks, all micro-batches), ``aux_normalizer`` the number of
sequences in it, and each MoE layer's aux is its share of its sequences' balance losses (per-sequence
statistics, see ``distseq.models.moe``). Summed over ranks and micro-batches (which is what accumulating and
summing gradients over dp x sp does) this is exactly the single-process loss of the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from distseq.config.model import ModelConfig
from distseq.models.deltanet import GatedDeltaNet, require_delta_rule
from distseq.models.layers import LinearAttention, SoftmaxAttention, SwiGLU
from distseq.models.mamba import Mamba2
from distseq.parallel.sequence.context import SequenceParallel

__all__ = ["MIXERS", "Block", "HybridLM", "LMOutput"]

IGNORE_INDEX = -100

#: ``layer_pattern`` letter -> the token mixer of that layer (``distseq.config.model.LAYER_KINDS``)
MIXERS: dict[str, type[nn.Module]] = {
    "A": SoftmaxAttention,
    "L": LinearAttention,
    "M": Mamba2,
    "G": GatedDeltaNet,
}


@dataclass
class LMOutput:
    loss: torch.Tensor  # this rank's share: lm_loss + aux_loss
    lm_loss: torch.Tensor  # sum of local token losses / loss_normalizer
    aux_loss: torch.Tensor  # sum over MoE layers of this rank's aux share / aux_normalizer
    num_tokens: int  # local target tokens (labels != -100)
    #: with ``predict=True``: greedy next-token ids at the labelled positions, flattened in row order
    predictions: torch.Tensor | None = None


# A pytree node, so wrappers that look for the output's tensors (FSDP2 registers its pre-backward hooks on them;
# torch 2.11's FSDP2 finds tensors inside pytrees only) see the loss.
torch.export.register_dataclass(LMOutput, serialized_type_name="distseq.LMOutput")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_kind: str, mlp_kind: str):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = MIXERS[layer_kind](cfg)  # the token mixer, whatever its kind
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if mlp_kind == "M":
            from distseq.models.moe import MoE

            self.mlp = MoE(
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                cfg.num_experts,
                cfg.top_k,
                shared_intermediate_size=cfg.moe_intermediate_size if cfg.shared_expert else None,
                capacity_factor=cfg.capacity_factor,
                aux_loss_coef=cfg.aux_loss_coef,
            )
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, seq: SequenceParallel) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.attn_norm(x), seq)
        out = self.mlp(self.mlp_norm(x))
        if isinstance(out, tuple):  # MoE: (output, aux loss share)
            return x + out[0], out[1]
        return x + out, None


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)


class HybridLM(nn.Module):
    """Embedding -> blocks (``layer_pattern`` x ``mlp_pattern``) -> RMSNorm -> LM head -> chunked loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(
            Block(cfg, layer, mlp) for layer, mlp in zip(cfg.layer_pattern, cfg.mlp_kinds(), strict=True)
        )
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        #: per-token loss from (logits of one chunk, labels); a tensor-parallel plan swaps in the vocab-parallel one
        self.token_losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _token_losses
        #: greedy ids from logits; a tensor-parallel plan swaps in the vocab-parallel one
        self.token_argmax: Callable[[torch.Tensor], torch.Tensor] = partial(torch.argmax, dim=-1)
        #: recompute each block in backward instead of keeping its activations
        self.activation_checkpointing = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def hidden_states(self, input_ids: torch.Tensor, seq: SequenceParallel) -> tuple[torch.Tensor, torch.Tensor]:
        """Final normalised hidden states ``[B, n, hidden]`` and the summed aux loss."""
        x = self.embed(input_ids)
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x, block_aux = checkpoint(block, x, seq, use_reentrant=False)
            else:
                x, block_aux = block(x, seq)
            if block_aux is not None:
                aux = aux + block_aux
        return self.norm(x), aux

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        seq: SequenceParallel,
        *,
        loss_normalizer: float | None = None,
        aux_normalizer: float | None = None,
        predict: bool = False,
    ) -> LMOutput:
        """``input_ids``, ``labels``: ``[B, n]`` this rank's tokens in the layout's order, labels already the
        next tokens of the global sequence (-100 where none). ``loss_normalizer`` defaults to the local target
        count and ``aux_normalizer`` to ``B`` (right for a single process and one micro-batch). ``predict``
        also returns the greedy ids at the labelled positions (evaluation; only their logits are computed)."""
        if input_ids.shape != labels.shape:
            raise ValueError(f"input_ids and labels must match: {tuple(input_ids.shape)} vs {tuple(labels.shape)}")
        if "G" in self.config.layer_pattern:  # before any layer's collective, on every rank alike
            require_delta_rule(type(seq.linear), seq.linear.name)
        hidden, aux = self.hidden_states(input_ids, seq)
        aux = aux / float(aux_normalizer if aux_normalizer is not None else input_ids.shape[0])
        num_tokens = int((labels != IGNORE_INDEX).sum())
        normalizer = float(loss_normalizer if loss_normalizer is not None else max(num_tokens, 1))
        total = hidden.new_zeros((), dtype=torch.float32)
        flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        step = self.config.loss_chunk_size
        for start in range(0, flat_labels.numel(), step):
            # Logits of one chunk at a time, forward and (recomputed) backward.
            total = total + checkpoint(
                self._chunk_loss,
                flat_hidden[start : start + step],
                flat_labels[start : start + step],
                use_reentrant=False,
            )
        lm_loss = total / normalizer
        predictions = None
        if predict:
            with torch.no_grad():
                predictions = self.token_argmax(self.lm_head(hidden[labels != IGNORE_INDEX]))
        return LMOutput(lm_loss + aux, lm_loss, aux, num_tokens, predictions)

    def _chunk_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.token_losses(self.lm_head(hidden), labels).sum()
