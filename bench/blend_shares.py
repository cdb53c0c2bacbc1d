"""What a phase's blend gives each source of the training signal: the phase's train samples
built as training builds them (model/data.build_datasets, Megatron's indices in a scratch
folder), then per source the samples drawn and the loss tokens they carry (their loss masks,
as the loss sees them), against the share of the blend's weight it was given.

    .venv/bin/python bench/blend_shares.py [--params params.yaml] [--pack data/pack] [PHASE ...]
            [--set sft.blend_unit=samples]

Prints one markdown table per phase; reads the pack only (the indices go to a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(pack_dir: Path, cfg, cache_dir: Path) -> dict[str, dict]:
    """Per source of the phase's blend: its requested share, the samples of the train blend
    drawn from it and the loss tokens they carry."""
    from model.data import build_datasets, drawn_loss_tokens

    manifest = json.loads((pack_dir / "manifest.json").read_text())
    train, _ = build_datasets(pack_dir, cfg.blend, cfg.seq_length, cfg.seed,
                              cfg.steps * cfg.global_batch_size, 1, manifest["vocab_size"],
                              cache_dir, blend_unit=cfg.blend_unit)
    drawn = drawn_loss_tokens(train, cfg.steps * cfg.global_batch_size)
    all_loss = sum(loss for _, loss in drawn.values())
    total_weight = sum(cfg.blend.values())
    return {n: {"requested": cfg.blend[n] / total_weight, "samples": samples,
                "loss_tokens": loss, "loss_share": loss / all_loss}
            for n, (samples, loss) in drawn.items()}


def main() -> int:
    from codeworld.config import load_params
    from codeworld.overrides import apply_overrides

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phases", nargs="*", default=["sft"])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--pack", default=str(ROOT / "data" / "pack"))
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    params = apply_overrides(load_params(args.params), args.set)
    for phase in args.phases:
        cfg = getattr(params, phase)
        with tempfile.TemporaryDirectory() as tmp:
            rows = measure(Path(args.pack), cfg, Path(tmp))
        print(f"\n{phase} (blend_unit {cfg.blend_unit}, "
              f"{cfg.steps * cfg.global_batch_size} samples of {cfg.seq_length})\n")
        print("| source | weight share | samples | loss tokens / sample | loss-token share |")
        print("|---|---:|---:|---:|---:|")
        for n, r in rows.items():
            per = r["loss_tokens"] / r["samples"] if r["samples"] else 0.0
            print(f"| {n} | {r['requested']:.3f} | {r['samples']} | {per:.1f} | "
                  f"{r['loss_share']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
