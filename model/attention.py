"""Core attention through torch's scaled_dot_product_attention, for Megatron-Core's local
(non-Transformer-Engine) layer spec.

The local spec's own DotProductAttention materialises the [b, heads, s, s] score matrix and
softmaxes it in FP32; on an H200 that halved tokens/s against a plain-PyTorch GPT using SDPA
(18% vs 37% MFU, bench/train_gpu.py). SDPA picks flash / memory-efficient kernels on GPUs and
a fused kernel on CPU, and takes grouped-query heads without copying them. The module keeps
DotProductAttention's constructor and forward contract so it drops into the layer spec; the
TE spec (GPUs with transformer-engine) does not use it.
"""

from __future__ import annotations

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
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not split the sequence: context parallel "
                             "needs Transformer Engine's attention")
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
        sk, groups = key.shape[0], key.shape[2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))   # [b, h, s, d]
        mask_type = attn_mask_type or self.attn_mask_type
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask          # Megatron: True = masked out; SDPA: True = attend
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk:
                causal = True
            else:   # decoding a chunk after a KV cache: the queries are the last sq positions
                mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=groups != heads)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * d)
