"""RMSNorm for Megatron-Core's local (non-Transformer-Engine) layer spec, with sequence parallel.

Megatron's own torch norm (WrappedTorchNorm) refuses sequence parallel: under it each tensor-
parallel rank normalises only its slice of the sequence, so the norm weight's gradient is a
partial sum that finalize_model_grads must all-reduce over the TP group, and Megatron finds such
parameters by their `sequence_parallel` attribute, which TE's and Apex's norms set and torch's
does not. This one computes exactly what torch.nn.RMSNorm computes (the same function, an FP32
weight named `weight`, so checkpoints are interchangeable) and sets the attribute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"model.norm.RMSNorm built for normalization={config.normalization!r}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
