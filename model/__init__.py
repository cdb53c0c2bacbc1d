"""The training engine: a Megatron-Core GPT trained with tensor, pipeline, context and data
parallelism (torchrun), Transformer Engine FP8 on Hopper GPUs; the same code on CPU (gloo)."""

import os

# CPU matrix products go through oneMKL, which without its strict Conditional Numerical
# Reproducibility mode may split a product's sums differently from one run to the next once it
# uses more than one thread: the same 3-step training on 2 threads gave another loss at step 3
# in 3 of 11 runs (AUTO,STRICT: 28 of 28 the same), and two `make run`s trained different
# weights. STRICT also makes the sums independent of the thread count, which the pipeline takes
# from the machine's cores: 30 steps on 1, 2 and 4 threads gave one loss curve and the same
# weights (without STRICT, 1 and 4 threads differed). MKL reads this at its first call, so it
# holds for this process when set here, before any tensor math, and for every process started
# from it (torchrun ranks, the benchmark's peer). AUTO keeps each CPU's fastest code path:
# results are the same on one kind of CPU, not across kinds.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
