"""The training engine: a Megatron-Core GPT trained with tensor, pipeline, context and data
parallelism (torchrun), Transformer Engine FP8 on Hopper GPUs; the same code on CPU (gloo)."""

import os

# CPU matrix products go through oneMKL, which without its Conditional Numerical
# Reproducibility mode may split a product's sums differently from one run to the next once it
# uses more than one thread: two runs of the same 3-step training on 2 threads gave another
# loss at step 3 in 3 of 11 runs (1 thread: 5 of 5 the same; AUTO,STRICT: 28 of 28), and two
# `make run`s trained different weights. MKL reads this at its first call,
# so it holds for this process when set here, before any tensor math, and for every process
# started from it (torchrun ranks, the benchmark's peer). AUTO keeps the machine's fastest code
# path: results stay reproducible on one machine and thread count, not across CPUs.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
