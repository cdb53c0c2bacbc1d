"""Initial weights that do not depend on the parallel layout.

Megatron draws every weight from the RNG of the rank that builds it, in the order it builds
them. Seeded with the bare seed on every pipeline stage, the second stage's first layer drew
layer 0's numbers: PP=2 started from another model than one process (step 1's loss 6.4480
against 6.4586 for the 2-layer test model). Here the RNGs are seeded afresh from (seed, what is
built) before the embedding and before each layer, by its global number, so each layer draws
the same numbers wherever it lives (pipeline stage, virtual chunk, data-parallel rank).

On CPU, Megatron's CPU initialisation (use_cpu_initialization) draws each weight whole and
keeps this rank's tensor-parallel shard, so tensor parallel draws the same model too. On GPU,
Megatron draws each shard on the device from its tensor-parallel RNG (seed + 2718 + TP rank):
the same across pipeline, virtual pipeline and data parallel, but a TP=2 model differs from a
TP=1 one there (as it always did on GPU); CPU and GPU draw different numbers (different RNGs).
The output layer draws after the last layer, from that layer's seeded stream, in every layout.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_layer import (TransformerLayer,
                                                         get_transformer_layer_offset)
from megatron.core.utils import get_pg_rank

from model.seeds import seed_of


def seed_rngs(config, seed: int) -> None:
    """Every RNG weights may be drawn from: torch's default generators (CPU initialisation) and
    Megatron's tracked ones (device initialisation), as model_parallel_cuda_manual_seed sets
    them for training, with the tracker kind the config's CUDA graphs need."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, te_rng_tracker=config.use_te_rng_tracker,
                                    use_cudagraphable_rng=config.cuda_graph_impl != "none")


def seed_stream(config, seed: int, what: str) -> None:
    """The RNGs seeded for drawing `what` (a part of the model named as in one process)."""
    seed_rngs(config, seed_of(seed, "initial weights", what))


class LayerSeededTransformerLayer(TransformerLayer):
    """Megatron's TransformerLayer, its RNGs seeded by the layer's global number before it
    builds its weights. `init_seed` comes from the layer spec's params."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None,
                 pg_collection=None, vp_stage=None, *, init_seed: int):
        # the global number as TransformerLayer computes it, needed before it builds anything
        pp = (pg_collection.pp if pg_collection is not None
              else ps.get_pipeline_model_parallel_group())
        number = layer_number + get_transformer_layer_offset(config, vp_stage, get_pg_rank(pp))
        seed_stream(config, init_seed, f"layer {number}")
        super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection, vp_stage)
        if self.layer_number != number:
            raise RuntimeError(f"layer seeded as global layer {number}, but Megatron numbered it "
                               f"{self.layer_number}: its layer numbering changed")
