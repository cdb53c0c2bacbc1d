"""The training engine: a Megatron-Core GPT trained with tensor, pipeline, context and data
parallelism (torchrun), Transformer Engine FP8 on Hopper GPUs; the same code on CPU (gloo)."""
