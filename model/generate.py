"""Inference with the trained GPTModel: load a phase's checkpoint into one process (TP = PP = 1)
and sample from it. Shared by evaluation, RL and the neural debugger.

Decoding keeps a KV cache in Megatron-Core's own `StaticInferenceContext` (passed to
GPTModel.forward as `inference_context`): the prompt is run once, then each new token alone,
its keys and values appended to the cache. `cache=False` recomputes the whole sequence at each
token (the forward pass training runs); both give the same greedy tokens (tests/test_evaluate.py
checks it). Rows of one batch share a prompt length (RL samples G completions of one prompt), so
no padding is needed and every row's cache offset is the same.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from codeworld.config import Params, PhaseConfig


def init_single_process() -> None:
    """A one-rank process group and model-parallel state, for inference outside torchrun."""
    from megatron.core import parallel_state as ps

    if not torch.distributed.is_initialized():
        with socket.socket() as s:   # a free loopback port: several tools may run at once
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        from model.trainer import init_distributed

        init_distributed("auto")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)   # the RNG tracker attention enters, even in eval


class _Wrapped:
    """checkpoint.load expects DDP-wrapped chunks (`.module`)."""

    def __init__(self, module):
        self.module = module


@dataclass
class LoadedModel:
    model: torch.nn.Module
    vocab_size: int          # the tokenizer's (the model's output is padded beyond it)
    iteration: int
    checkpoint: Path

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids -> [batch, seq, vocab] float logits (padding columns dropped)."""
        return forward_logits(self.model, tokens, self.vocab_size)

    def sample(self, prompt: list[int], *, n: int = 1, max_new_tokens: int = 256,
               stop_ids: set[int] = frozenset(), temperature: float = 0.0,
               seed: int = 0, max_length: int | None = None,
               cache: bool = True) -> list[list[int]]:
        return sample(self.model, prompt, vocab_size=self.vocab_size, n=n,
                      max_new_tokens=max_new_tokens, stop_ids=stop_ids, temperature=temperature,
                      seed=seed, max_length=max_length, cache=cache)


def forward_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    pos = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    out = model(tokens, pos, None)            # no labels: logits [batch, seq, padded vocab]
    return out[..., :vocab_size].float()


def _without_cpu_compat():
    """Decode steps run outside model/cpu_compat's TorchFunctionMode: it intercepts every torch
    call (a third of a one-token step on CPU) and is only needed where Megatron allocates on
    `cuda`, which it does in the prefill (the cache buffers), not in the steps after it."""
    from model import cpu_compat

    # torch's own (private) mode-stack helpers; without them the steps keep the mode (slower)
    current = getattr(torch.overrides, "_get_current_function_mode", lambda: None)
    pop = getattr(torch.overrides, "_pop_mode_temporarily", None)
    if pop is not None and isinstance(current(), cpu_compat._CudaAsCpu):
        return pop()
    return contextlib.nullcontext()


@contextlib.contextmanager
def fp8_off(model):
    """Run `model` without FP8 while inside: Transformer Engine's layers take their BF16 GEMMs
    (Megatron enters TE's FP8 autocast only while its config's `fp8` is set). FP8 GEMMs need
    row counts in multiples of 16 (32 for MXFP8) and decoding feeds rows of n tokens; RL
    samples with the model it trains in FP8, evaluation loads checkpoints in BF16 already."""
    config = getattr(model, "config", None)
    saved = getattr(config, "fp8", None)
    if saved is None:
        yield
        return
    config.fp8 = None   # one TransformerConfig object is shared by every layer of the model
    try:
        yield
    finally:
        config.fp8 = saved


@contextlib.contextmanager
def one_thread():
    """On CPU, one intra-op thread while inside. A one-token step is many tiny ops: one thread
    runs them as fast as two on an idle machine, and ~8x faster on a busy one (OpenMP threads
    wait on each other); the same holds, less strongly, for this tiny model's full forwards."""
    if torch.cuda.is_available():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Cached:
    """Next-token logits with Megatron-Core's static KV cache: the prompt once, then one token
    per call."""

    def __init__(self, model, rows: torch.Tensor, total: int, vocab_size: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model, self.vocab_size = model, vocab_size
        self.device = next(model.parameters()).device
        self.ctx = StaticInferenceContext(rows.shape[0], total)
        self.first = rows.to(self.device)

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        start = self.ctx.sequence_len_offset
        pos = torch.arange(start, start + tokens.shape[1], device=self.device).expand_as(tokens)
        # runtime_gather_output: Megatron's inference path asserts it (TP logits gathered)
        out = self.model(tokens, pos, None, inference_context=self.ctx, runtime_gather_output=True)
        self.ctx.increment_sequence_len_offset(tokens.shape[1])
        return out[:, -1, :self.vocab_size].float()   # only the last position is materialised

    def __call__(self, nxt: torch.Tensor | None) -> torch.Tensor:
        if nxt is None:
            with one_thread():
                return self._forward(self.first)
        self.ctx.enable_decode_mode()
        with _without_cpu_compat(), one_thread():
            return self._forward(nxt.to(self.device).unsqueeze(-1))


@torch.no_grad()
def sample(model, prompt: list[int], *, vocab_size: int, n: int = 1, max_new_tokens: int = 256,
           stop_ids: set[int] = frozenset(), temperature: float = 0.0, seed: int = 0,
           max_length: int | None = None, cache: bool = True) -> list[list[int]]:
    """n continuations of one prompt (greedy at temperature 0), each cut after its first stop
    token (kept) or at max_new_tokens / max_length total tokens. Deterministic for a seed.
    cache=False recomputes the whole sequence per token (same tokens, slower). A model set up
    for FP8 samples without it (fp8_off)."""
    with fp8_off(model):
        return _sample(model, prompt, vocab_size, n, max_new_tokens, stop_ids, temperature,
                       seed, max_length, cache)


def _sample(model, prompt, vocab_size, n, max_new_tokens, stop_ids, temperature, seed,
            max_length, cache) -> list[list[int]]:
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    rows = torch.tensor([prompt] * n, dtype=torch.long)
    done = [False] * n
    out: list[list[int]] = [[] for _ in range(n)]
    limit = max_new_tokens if max_length is None else min(max_new_tokens, max_length - len(prompt))
    step = _Cached(model, rows, len(prompt) + max(0, limit), vocab_size) if cache and limit > 0 \
        else None
    nxt = None
    for _ in range(max(0, limit)):
        if step is not None:
            last = step(nxt).cpu()
        else:
            last = forward_logits(model, rows, vocab_size)[:, -1, :].cpu()
        if temperature <= 0:
            nxt = last.argmax(-1)
        else:
            probs = torch.softmax(last / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(t)
                done[i] = t in stop_ids
        if all(done):
            break
        if step is None:
            rows = torch.cat([rows, nxt.unsqueeze(-1)], 1)
    if was_training:
        model.train()
    return out


def load(params: Params, checkpoint_dir: Path, vocab_size: int, phase: str = "pretrain",
         iteration_dir: Path | None = None) -> LoadedModel:
    """The latest checkpoint of a phase directory (or iteration_dir) in this process."""
    from model import checkpoint
    from model.build import build_chunks, resolve_precision, transformer_config

    init_single_process()
    par = params.parallel.model_copy(update=dict(
        nproc=1, nnodes=1, tensor=1, pipeline=1, virtual_pipeline=None, context=1,
        sequence_parallel=False, distributed_optimizer=False))
    cfg = getattr(params, phase, None)
    if not isinstance(cfg, PhaseConfig):
        # a phase with a config of its own (rl) or none in this params file: inference needs
        # only the architecture (params.model); precision follows the hardware below
        cfg = PhaseConfig()
    precision = resolve_precision(cfg.model_copy(update={"precision": "auto"}))
    if precision.name == "fp8":   # inference here is plain BF16 (no FP8 recipe state needed)
        from model.build import Precision

        precision = Precision("bf16", use_te=precision.use_te)
    tcfg = transformer_config(params.model, par, cfg, precision)
    # its weights are the checkpoint's: the initial ones are drawn from seed 0, which
    # init_single_process seeded
    model = build_chunks(params.model, par, tcfg, precision, vocab_size, cfg.seq_length, 0)[0]
    if iteration_dir is None:
        found = checkpoint.latest(Path(checkpoint_dir))
        if found is None:
            raise FileNotFoundError(f"{checkpoint_dir}: no checkpoint (latest.json) to load")
        iteration_dir = found[1]
    iteration = checkpoint.load(Path(iteration_dir), [_Wrapped(model)])
    model.eval()
    return LoadedModel(model, vocab_size, iteration, Path(iteration_dir))
