"""Our GPTModel in Hugging Face's Llama layout, for the `export` stage.

The architecture is Llama's (RoPE with rotate-half, SwiGLU, RMSNorm, grouped-query attention, no
biases), so a trained checkpoint becomes a `LlamaForCausalLM` that transformers, vLLM, llama.cpp
and the rest load as it is. Only the names and one layout differ:

- Megatron fuses Q, K and V in one `linear_qkv` whose rows go by query group: for each of the
  `groups` groups, its `heads / groups` query heads, then its key head, then its value head.
  Llama keeps q/k/v apart, the query heads of group g being heads g*n .. g*n+n-1, which is what
  its repeat of each key/value head n times expects.
- SwiGLU's `linear_fc1` holds the gate rows, then the up rows (Megatron's swiglu applies silu to
  the first half of its output).
- The Transformer Engine spec keeps the pre-norms inside the linear layers
  (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`) instead of separate modules.

Megatron pads the vocabulary for tensor parallel (model/build.py:padded_vocab); the export keeps
the tokenizer's rows only. A weight this mapping does not know (a bias, a QK-norm: another
architecture) is refused rather than dropped, so an export never silently changes the model.
"""

from __future__ import annotations

import re

import torch

from codeworld.config import ModelConfig


class ExportMappingError(ValueError):
    """A checkpoint whose weights do not map one-to-one onto Llama's."""


# Megatron name (after the layer prefix) -> Llama name; the fused ones are split below.
_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",     # TE spec
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",       # TE spec
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def config_dict(model: ModelConfig, vocab_size: int, dtype: torch.dtype,
                eps: float, special: dict[str, int]) -> dict:
    """The keyword arguments of transformers' LlamaConfig for this model."""
    return dict(
        vocab_size=vocab_size, hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups,
        head_dim=model.hidden_size // model.num_attention_heads,
        max_position_embeddings=model.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_base)},
        rms_norm_eps=eps, hidden_act="silu", attention_bias=False, mlp_bias=False,
        tie_word_embeddings=model.tie_embeddings, initializer_range=model.init_method_std,
        dtype=str(dtype).removeprefix("torch."), **special)


def split_qkv(weight: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Megatron's fused QKV rows [groups x (n q heads, k, v) x head_dim] -> Llama's q, k, v."""
    groups, heads = model.num_query_groups, model.num_attention_heads
    d = model.hidden_size // heads
    per_group = weight.reshape(groups, heads // groups + 2, d, weight.shape[-1])
    q = per_group[:, :-2].reshape(heads * d, -1)
    k = per_group[:, -2].reshape(groups * d, -1)
    v = per_group[:, -1].reshape(groups * d, -1)
    return q, k, v


def llama_state_dict(state: dict[str, torch.Tensor], model: ModelConfig,
                     vocab_size: int) -> dict[str, torch.Tensor]:
    """One process's full (TP = PP = 1) GPTModel state dict -> LlamaForCausalLM's."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, value in state.items():
        name = name.removeprefix("module.")          # Float16Module (BF16 models)
        if name.endswith("_extra_state"):            # TE/FP8 bookkeeping, not weights
            continue
        if name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = value[:vocab_size]
        elif name == "output_layer.weight":
            out["lm_head.weight"] = value[:vocab_size]
        elif name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = value
        elif m := _LAYER_KEY.fullmatch(name):
            i, rest = m.groups()
            prefix = f"model.layers.{i}."
            if rest in _LAYER:
                out[prefix + _LAYER[rest]] = value
            elif rest == "self_attention.linear_qkv.weight":
                for part, w in zip("qkv", split_qkv(value, model)):
                    out[f"{prefix}self_attn.{part}_proj.weight"] = w
            elif rest == "mlp.linear_fc1.weight":
                gate, up = value.chunk(2, dim=0)
                out[prefix + "mlp.gate_proj.weight"] = gate
                out[prefix + "mlp.up_proj.weight"] = up
            else:
                unknown.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise ExportMappingError(f"weights with no Llama counterpart: {unknown[:5]}"
                                 f"{' ...' if len(unknown) > 5 else ''} (another architecture "
                                 f"than model/build.py's: extend model/hf_llama.py)")
    if model.tie_embeddings:
        out.pop("lm_head.weight", None)
    # contiguous copies: safetensors refuses views that share storage (fc1's two halves)
    return {k: v.detach().contiguous().clone() for k, v in sorted(out.items())}
