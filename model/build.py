"""The model: a Megatron-Core GPTModel with a CWM-like architecture, its precision and layer
spec chosen from the hardware (Transformer Engine + FP8 on Hopper, BF16 on other GPUs, FP32 on
CPU), one model chunk per virtual pipeline stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codeworld.config import ConfigError, ModelConfig, ParallelConfig, Params, PhaseConfig


class TrainingSetupError(ConfigError):
    """A configuration this hardware cannot run (said before any work): a ConfigError, so the
    commands print its one line, as for any other setting that cannot be."""


def have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def have_fused_softmax() -> bool:
    """The local spec's fused softmax kernels come from Apex/Megatron's compiled extensions;
    without them Megatron raises ImportError mid-forward, so fall back to its torch softmax."""
    try:
        import scaled_upper_triang_masked_softmax_cuda  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class Precision:
    name: str            # fp32 | bf16 | fp8
    use_te: bool         # Transformer Engine layer spec

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.float32 if self.name == "fp32" else torch.bfloat16


def resolve_precision(phase: PhaseConfig, name: str = "precision") -> Precision:
    """The phase's precision on this machine; `name` is the setting's, for the error."""
    gpu = torch.cuda.is_available()
    hopper = gpu and torch.cuda.get_device_capability() >= (8, 9)
    te = gpu and have_te()
    wanted = phase.precision
    if wanted == "auto":
        wanted = "fp8" if (hopper and te) else ("bf16" if gpu else "fp32")
    if wanted == "fp8" and not (hopper and te):
        # Megatron accepts fp8 with its local spec and silently trains in BF16: refuse instead.
        raise TrainingSetupError(
            f"{name} fp8 needs Transformer Engine and an FP8-capable GPU (Hopper/Ada or newer); "
            f"found gpu={gpu}, fp8-capable={hopper}, transformer_engine={have_te()}")
    return Precision(wanted, use_te=te)


def check_cuda_graph(phase: str, graph: str, precision: Precision) -> None:
    """CUDA graphs replay captured GPU work: there is none to capture on CPU."""
    if graph != "none" and not torch.cuda.is_available():
        raise TrainingSetupError(f"{phase}.cuda_graph={graph!r} needs a GPU (CUDA graphs); "
                                 f"this machine has none: set it to \"none\"")
    if graph == "layer" and not precision.use_te:
        # Megatron's per-layer graphs pass the attention mask through TE's helpers
        raise TrainingSetupError(f"{phase}.cuda_graph='layer' needs Transformer Engine; "
                                 f"'full_iteration' does not")


def check_backend(backend: str) -> None:
    """NCCL runs on CUDA devices only: on CPU the process group would fail at its first use."""
    if backend == "nccl" and not torch.cuda.is_available():
        raise TrainingSetupError("parallel.backend='nccl' needs CUDA GPUs; this machine has none: "
                                 "set it to \"auto\" (gloo on CPU) or \"gloo\"")


def check_machine(params: Params, phase: str) -> Precision:
    """What `phase` needs of this machine (its precision, CUDA graphs, the process group's
    backend), checked before any work: by the stage before it claims the phase's folder (a
    new precision or graph mode is a new fingerprint, which clears it), by the ranks before
    the process group. Returns the precision."""
    cfg = getattr(params, phase)
    precision = resolve_precision(cfg, f"{phase}.precision")
    # rl has no cuda_graph: it samples with the model it trains, at other shapes
    check_cuda_graph(phase, getattr(cfg, "cuda_graph", "none"), precision)
    check_backend(params.parallel.backend)
    return precision


def padded_vocab(vocab_size: int, model: ModelConfig, multiple: int = 64) -> int:
    """The embedding's and output layer's rows: the vocabulary padded to a multiple of 64 x the
    query groups. Megatron splits those rows over the TP ranks, and every TP the model allows
    divides its query groups, so each rank's share is a multiple of 64 in every layout. Padded
    per layout (64 x TP), the model itself changed with the layout: its cross-entropy
    normalises over the padded columns too, and a checkpoint loads with rows cut or added
    (Megatron allows that mismatch silently): 650 ids were 768 columns under TP=2, 704 under
    one process, and a TP=2 checkpoint resumed by one process lost 0.086 of loss at once."""
    step = multiple * model.num_query_groups
    return -(-vocab_size // step) * step


def transformer_config(model: ModelConfig, par: ParallelConfig, phase: PhaseConfig,
                       precision: Precision, cuda_graph: str = "none"):
    """Megatron's config of the model. `cuda_graph` is the training step's (the Trainer's):
    sampling (model/generate.py) builds the same model without graphs."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fp8 = precision.name == "fp8"
    gpu = torch.cuda.is_available()
    # (an empty scope is Megatron's "the whole layer"; its default, "full", says so in a warning)
    graphs = {"none": {"cuda_graph_scope": []},
              "layer": {"cuda_graph_impl": "local", "cuda_graph_scope": []},
              "full_iteration": {"cuda_graph_impl": "local", "cuda_graph_scope": ["full_iteration"]}}
    return TransformerConfig(
        **graphs[cuda_graph],
        # a graph replays the RNG states it captured: those of TE's tracker, or Megatron's
        # graph-safe ones (model/trainer.py seeds the one chosen here)
        use_te_rng_tracker=cuda_graph != "none" and precision.use_te,
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size, init_method_std=model.init_method_std,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=par.tensor, pipeline_model_parallel_size=par.pipeline,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline,
        context_parallel_size=par.context, sequence_parallel=par.sequence_parallel,
        pipeline_dtype=precision.params_dtype, params_dtype=precision.params_dtype,
        bf16=precision.name != "fp32", fp8="hybrid" if fp8 else None,
        fp8_recipe=phase.fp8_recipe if fp8 else "delayed",
        # The loss is a sum over loss-masked tokens divided by their count across microbatches
        # and data-parallel ranks: masks (agent observations) weigh every token the same.
        calculate_per_token_loss=True,
        use_cpu_initialization=not gpu,
        # Fusions need TE, Apex or a GPU compiler; CPU runs keep them off.
        bias_activation_fusion=gpu, bias_dropout_fusion=gpu,
        masked_softmax_fusion=gpu and have_fused_softmax(),
        apply_rope_fusion=gpu and precision.use_te, persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        recompute_granularity="full" if phase.recompute else None,
        recompute_method="uniform" if phase.recompute else None,
        recompute_num_layers=1 if phase.recompute else None,
    )


def layer_spec(precision: Precision, init_seed: int):
    """Megatron's layer spec, its layer seeding its own initial weights from `init_seed` and
    its global number (model/initial_weights.py)."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                           get_gpt_layer_with_transformer_engine_spec)
    from model.initial_weights import LayerSeededTransformerLayer

    if precision.use_te:
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        from model.attention import SDPAttention
        from model.norm import RMSNorm

        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        # Megatron's specs exist to swap submodules: its unfused core attention for SDPA (which
        # also does context parallel), its torch norms for one that allows sequence parallel.
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
    return dataclasses.replace(spec, module=LayerSeededTransformerLayer,
                               params={**spec.params, "init_seed": init_seed})


def block_spec(layer, config, precision: Precision, vp_stage: int | None):
    """The local spec's block: its layers and, as the final norm, the same RMSNorm (Megatron
    would take its torch norm, which refuses sequence parallel). The TE spec as it is."""
    if precision.use_te:
        return layer
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)
    from model.norm import RMSNorm

    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=RMSNorm)


def build_chunks(model: ModelConfig, par: ParallelConfig, config, precision: Precision,
                 vocab_size: int, seq_length: int, seed: int) -> list:
    """This rank's model chunks (one, or one per virtual pipeline stage), their initial weights
    a function of `seed` alone, whatever the layout (model/initial_weights.py). The RNGs are
    left seeded with `seed`, as Megatron's training seeds them."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from model.initial_weights import seed_rngs, seed_stream

    spec = layer_spec(precision, seed)
    chunks = []
    for vp in range(par.virtual_pipeline or 1):
        vp_stage = vp if par.virtual_pipeline else None
        # the embedding, built first by the chunk that has it; each layer seeds its own
        seed_stream(config, seed, "embedding")
        chunk = GPTModel(
            config=config, transformer_layer_spec=block_spec(spec, config, precision, vp_stage),
            vocab_size=padded_vocab(vocab_size, model),
            max_sequence_length=model.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_output=True, share_embeddings_and_output_weights=model.tie_embeddings,
            position_embedding_type="rope", rotary_base=model.rotary_base, vp_stage=vp_stage)
        if precision.name != "fp32":
            # As Megatron's own training does: every parameter (norms too) in BF16, inputs cast
            # in, logits cast out to FP32. Its mixed-precision optimizer numbers the BF16
            # parameters assuming this; a mixed model breaks its checkpoint state dict.
            from megatron.core.transformer.module import Float16Module

            chunk = Float16Module(config, chunk)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    seed_rngs(config, seed)
    return chunks


def count_parameters(model: ModelConfig, vocab_size: int) -> int:
    """Parameters of the whole (unsharded) model, for MFU."""
    emb = vocab_size * model.hidden_size * (1 if model.tie_embeddings else 2)
    return _block_parameters(model) + emb


def _block_parameters(model: ModelConfig) -> int:
    """The transformer layers' parameters and the final norm's: all but the embeddings."""
    h, f, L = model.hidden_size, model.ffn_hidden_size, model.num_layers
    kv = model.num_query_groups * (h // model.num_attention_heads)
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h
    return L * per_layer + h


def flops_per_token(model: ModelConfig, vocab_size: int, seq_length: int) -> float:
    """Training FLOPs per token: 6 x the parameters a token multiplies by (the layers' and the
    output layer's, not the input embedding's lookup) + attention (PaLM's count). The output
    layer's matmul is counted whether or not its weight is the input embedding's
    (tie_embeddings): sharing the weight does not share the compute."""
    n = _block_parameters(model) + vocab_size * model.hidden_size
    return 6 * n + 12 * model.num_layers * model.hidden_size * seq_length
