"""Benchmark: CPU tokens/s of our Megatron-Core training step against a plain-PyTorch GPT of
the same shape (RoPE, SwiGLU, RMSNorm, grouped-query attention; AdamW, gradient clipping,
the same micro-batches), in one run. Target: ours >= 0.8x the plain model.

Each side runs in its own process (Megatron's CPU redirection stays out of the plain model's
process), alternating for --rounds rounds; the median tokens/s of each side is compared.

    .venv/bin/python bench/train.py [--rounds 3] [--steps 10] [--set model.num_layers=8 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model  # noqa: E402,F401  (MKL's reproducible mode, model/__init__.py: both sides alike)


class Block(nn.Module):
    def __init__(self, h: int, heads: int, groups: int, ffn: int):
        super().__init__()
        self.heads, self.groups, self.d = heads, groups, h // heads
        self.norm1, self.norm2 = nn.RMSNorm(h), nn.RMSNorm(h)
        self.qkv = nn.Linear(h, h + 2 * groups * self.d, bias=False)
        self.proj = nn.Linear(h, h, bias=False)
        self.up = nn.Linear(h, 2 * ffn, bias=False)     # SwiGLU: gate and value in one matmul
        self.down = nn.Linear(ffn, h, bias=False)

    def forward(self, x, cos, sin):
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).split([h, self.groups * self.d, self.groups * self.d], -1)
        q = q.view(b, s, self.heads, self.d).transpose(1, 2)
        k = k.view(b, s, self.groups, self.d).transpose(1, 2)
        v = v.view(b, s, self.groups, self.d).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = self.heads // self.groups
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        gate, val = self.up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * val)


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, h: int, layers: int, heads: int, groups: int, ffn: int,
                 seq: int, base: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, h)
        self.blocks = nn.ModuleList(Block(h, heads, groups, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(h)
        self.out = nn.Linear(h, vocab, bias=False)
        d = h // heads
        inv = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
        ang = torch.outer(torch.arange(seq).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, tokens, labels, mask):
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin)
        logits = self.out(self.norm(x)).float()
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), reduction="none")
        return (loss * mask.view(-1)).sum(), mask.sum()


def batches(vocab: int, n: int, mbs: int, seq: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tok = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        out.append({"tokens": tok[:, :-1].contiguous(), "labels": tok[:, 1:].contiguous(),
                    "loss_mask": torch.ones(mbs, seq),
                    "position_ids": torch.arange(seq).expand(mbs, seq).contiguous()})
    return out


def worker(kind: str, steps: int, sets: list[str], vocab: int) -> dict:
    from codeworld.config import load_params
    from codeworld.overrides import apply_overrides

    params = apply_overrides(load_params(ROOT / "params.yaml"), sets)
    m, cfg = params.model, params.pretrain
    micro = cfg.global_batch_size // cfg.micro_batch_size
    data = batches(vocab, micro, cfg.micro_batch_size, cfg.seq_length)
    if kind == "plain":
        torch.manual_seed(cfg.seed)
        model = PlainGPT(vocab, m.hidden_size, m.num_layers, m.num_attention_heads,
                         m.num_query_groups, m.ffn_hidden_size, cfg.seq_length, m.rotary_base)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                weight_decay=cfg.weight_decay)

        def step():
            opt.zero_grad(set_to_none=True)
            total = 0
            for b in data:
                loss, n = model(b["tokens"], b["labels"], b["loss_mask"])
                loss.backward()
                total += n
            for p in model.parameters():
                p.grad /= total
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000),
                          RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        from model.trainer import Trainer, init_distributed

        init_distributed("gloo")
        trainer = Trainer(params, "pretrain", vocab)

        def step():
            trainer.train_step(data)
    for _ in range(2):   # warm-up: allocator, first-call paths
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t0
    tokens = steps * cfg.global_batch_size * cfg.seq_length
    return {"kind": kind, "tokens_per_s": tokens / dt, "seconds_per_step": dt / steps,
            "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--worker", choices=["plain", "megatron"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.set, args.vocab)))
        return 0
    runs: dict[str, list[float]] = {"megatron": [], "plain": []}
    for r in range(args.rounds):
        for kind in ("plain", "megatron") if r % 2 == 0 else ("megatron", "plain"):
            cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps),
                   "--vocab", str(args.vocab), *sum((["--set", s] for s in args.set), [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[kind].append(res["tokens_per_s"])
            print(f"round {r + 1} {kind:9s} {res['tokens_per_s']:9.1f} tokens/s "
                  f"({res['seconds_per_step'] * 1000:.0f} ms/step, {res['threads']} threads)", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = med["megatron"] / med["plain"]
    print(f"\n| trainer | median tokens/s | runs |\n|---|---|---|")
    for k in ("megatron", "plain"):
        print(f"| {k} | {med[k]:.1f} | {', '.join(f'{v:.0f}' for v in runs[k])} |")
    print(f"\nMegatron-Core step / plain PyTorch = {ratio:.2f}x (target >= 0.8x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"median": med, "runs": runs, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
