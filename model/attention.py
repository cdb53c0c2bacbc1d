"""Core attention through torch's scaled_dot_product_attention, for Megatron-Core's local
(non-Transformer-Engine) layer spec.

The local spec's own DotProductAttention materialises the [b, heads, s, s] score matrix and
softmaxes it in FP32; on an H200 that halved tokens/s against a plain-PyTorch GPT using SDPA
(18% vs 37% MFU, bench/train_gpu.py). SDPA picks flash / memory-efficient kernels on GPUs and
a fused kernel on CPU, and takes grouped-query heads without copying them. The module keeps
DotProductAttention's constructor and forward contract so it drops into the layer spec; the
TE spec (GPUs with transformer-engine) does not use it.

Context parallel (parallel.context = c > 1) is all-gather attention, as Llama 3 trained with: a
rank holds two of the sequence's 2c chunks (i and 2c-1-i, Megatron's load-balanced split of
the batch and of RoPE's positions), gathers every rank's keys and values (Megatron's sequence-
parallel gather over the context-parallel group; its backward reduce-scatters their gradients
back) and attends its queries to the whole sequence under the causal mask of their true
positions. TE's ring attention computes the same on GPUs; this is what runs on CPU and on GPUs
without TE.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.window_size is not None or config.softmax_type != "vanilla":
            raise ValueError("SDPAttention supports full causal softmax attention only")
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        # Megatron's layout: query [sq, b, heads, d], key/value [sk, b, groups, d] (this TP
        # rank's heads); the output is [sq, b, heads * d].
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention: packed sequences and attention bias need TE")
        sq, b, heads, d = query.shape
        groups = key.shape[2]
        mask_type = attn_mask_type or self.attn_mask_type
        mask, causal = None, False
        if self.config.context_parallel_size > 1:
            if attention_mask is not None or mask_type != AttnMaskType.causal:
                raise ValueError("SDPAttention's context parallel is for causal attention "
                                 "without an explicit mask")
            key, value, mask = gather_context(key, value, query.device)
        elif attention_mask is not None:
            mask = ~attention_mask          # Megatron: True = masked out; SDPA: True = attend
        elif mask_type == AttnMaskType.causal and sq > 1:
            sk = key.shape[0]
            if sq == sk:
                causal = True
            else:   # decoding a chunk after a KV cache: the queries are the last sq positions
                mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))   # [b, h, s, d]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=groups != heads)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * d)


def gather_context(key, value, device):
    """This context-parallel rank's keys and values -> the whole sequence's, in position order,
    and the causal mask [local queries, sequence] of this rank's two chunks (True = attend)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    group = ps.get_context_parallel_group()
    order, mask = context_layout(key.shape[0] // 2, group.size(), group.rank(), device)
    key, value = (gather_from_sequence_parallel_region(t, group=group)[order] for t in (key, value))
    return key, value, mask


@functools.lru_cache(maxsize=4)   # one shape per phase: not rebuilt in every layer and step
def context_layout(n: int, c: int, rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For chunks of n tokens over c ranks: the gathered rows in position order (rank j's
    rows hold its chunk j, then its chunk 2c-1-j), and this rank's causal mask."""
    first_row = [2 * n * k if k < c else 2 * n * (2 * c - 1 - k) + n for k in range(2 * c)]
    order = torch.cat([torch.arange(r, r + n) for r in first_row])
    mine = torch.cat([torch.arange(rank * n, (rank + 1) * n),
                      torch.arange((2 * c - 1 - rank) * n, (2 * c - rank) * n)])
    return order.to(device), (mine[:, None] >= torch.arange(2 * c * n)[None, :]).to(device)
