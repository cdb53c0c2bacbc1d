"""GRPO's arithmetic, apart from the loop (model/rl.py) so it is tested on its own: group-
normalised advantages, and the samples of a step as the trainer's micro-batches.

A sample is one prompt and one sampled completion; its micro-batch row is the two token lists
joined, with the loss on the completion's tokens only (the stop token included: the policy is
rewarded for ending its answer) and every token of it weighted by the sample's advantage
(model/trainer.py's policy_loss_func).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from codeworld.tokens import PAD_ID


@dataclass
class Sample:
    prompt: list[int]
    completion: list[int]
    advantage: float = 0.0


def group_advantages(rewards: list[float], eps: float) -> list[float]:
    """(r - mean) / (std + eps) over one group (population std): GRPO's critic-free baseline.
    A group whose rewards are all equal gets zeros: it says nothing about which sample was
    better."""
    n = len(rewards)
    if n == 0:
        return []
    if max(rewards) == min(rewards):
        # said so, not computed: the float mean of equal rewards may miss them by a rounding
        # residue, and residue / (residue-sized std + eps) is a nonzero advantage
        return [0.0] * n
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    return [(r - mean) / (std + eps) for r in rewards]


def microbatches(samples: list[Sample], micro_batch_size: int, width_multiple: int = 1) -> list[dict]:
    """Rows of `micro_batch_size` samples, each padded to its longest row, rounded up to a
    multiple of `width_multiple` (FP8 GEMMs need aligned row counts: FP8_WIDTH). Pads are out of
    the loss; attention is causal, so right padding never changes a real token's log-prob."""
    out = []
    for start in range(0, len(samples), micro_batch_size):
        chunk = samples[start:start + micro_batch_size]
        width = _round_up(max(len(s.prompt) + len(s.completion) for s in chunk) - 1,
                          width_multiple)
        tokens = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        labels = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.float)
        adv = torch.zeros((len(chunk), width), dtype=torch.float)
        for i, s in enumerate(chunk):
            if not s.prompt or not s.completion:
                raise ValueError("a sample needs a non-empty prompt and completion")
            seq = torch.tensor(s.prompt + s.completion, dtype=torch.long)
            n = len(seq) - 1
            tokens[i, :n] = seq[:-1]
            labels[i, :n] = seq[1:]
            # label t is token t+1: the completion's tokens are labels len(prompt)-1 .. n-1
            mask[i, len(s.prompt) - 1:n] = 1.0
            adv[i, :n] = s.advantage
        batch = {"tokens": tokens, "labels": labels, "loss_mask": mask, "advantage": adv,
                 "position_ids": torch.arange(width, dtype=torch.long).expand(len(chunk), width)
                 .contiguous()}
        out.append(batch)
    return out


def empty_microbatch(width: int = 1) -> dict:
    """A row of pads with nothing in the loss: a data-parallel rank with no samples this step
    still joins the step's collective gradient reduction."""
    return {"tokens": torch.full((1, width), PAD_ID, dtype=torch.long),
            "labels": torch.full((1, width), PAD_ID, dtype=torch.long),
            "loss_mask": torch.zeros((1, width)), "advantage": torch.zeros((1, width)),
            "position_ids": torch.arange(width, dtype=torch.long).unsqueeze(0)}


# Transformer Engine's FP8 GEMMs take row counts in multiples of 16 (MXFP8: 32): RL's rows
# (prompt + completion, any length) are padded to this when the phase trains in FP8.
FP8_WIDTH = 32


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
