"""Capacity: how each data stage's time and memory grow with the corpus, measured at three
corpus sizes (about a third, two thirds and all of the embedded default's stdlib, chosen by
the first letter of each file's path), each in its own storage root, default params otherwise
but without the default's caps (traces.max_programs, tokenizer.max_chars, pack max_tokens).

    .venv/bin/python bench/capacity.py [--sizes a-f,a-m,a-z] [--stages corpus,dedup,...] [--json F]

Each stage runs as `codeworld stage NAME` (what dvc.yaml runs) in a scratch directory; wall
time and the peak resident memory of its whole process tree (sampled every 0.1 s) are
recorded. Prints a markdown table: one row per stage, one column group per size.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("corpus", "dedup", "traces", "tokenizer", "pack")


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_stage(stage: str, params: Path, cwd: Path) -> dict:
    t0 = time.perf_counter()
    cmd = [str(Path(sys.executable).parent / "codeworld"), "stage", stage, "--params",
           str(params), "--no-track"]
    with open(cwd / f"{stage}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        ps, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                peak = max(peak, tree_rss(ps))
            except psutil.Error:
                pass
            time.sleep(0.1)
    if proc.returncode != 0:
        tail = (cwd / f"{stage}.log").read_text()[-2000:]
        raise RuntimeError(f"stage {stage} failed ({proc.returncode}):\n{tail}")
    metrics = json.loads((cwd / "metrics" / f"{stage}.json").read_text())
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak / 2**20),
            "records": metrics.get("records", metrics.get("kept", metrics.get("documents")))}


def exclude_for(size: str) -> list[str]:
    """'a-m' keeps paths whose first character is a..m (either case, and `_`-led ones with 'a-z')."""
    lo, hi = size.split("-")
    keep = {c for c in string.ascii_lowercase if lo <= c <= hi}
    drop = [c for c in string.ascii_lowercase if c not in keep]
    pats = [f"{c}*" for c in drop] + [f"{c.upper()}*" for c in drop]
    if hi != "z":
        pats.append("_*")
    return pats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="a-f,a-m,a-z")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--json")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directories")
    args = ap.parse_args()
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    results: dict[str, dict] = {}
    for size in args.sizes.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"capacity-{size}-"))
        (work / "metrics").mkdir()
        (work / ".cache").symlink_to(ROOT / ".cache")     # pinned sdists, fetched once
        params = json.loads(json.dumps(base))
        params["storage"]["root"] = str(work / "data")
        params["corpus"]["exclude"] = [*params["corpus"].get("exclude", []), *exclude_for(size)]
        # the default's caps would flatten the curves: every program traced, every token packed
        params["traces"]["max_programs"] = 0
        params["tokenizer"]["max_chars"] = 0
        # sources from the corpus only (the agent stage's data does not grow with it)
        params["pack"]["sources"] = {k: v for k, v in params["pack"]["sources"].items()
                                     if v["dataset"] in ("dedup", "traces")}
        params["tokenizer"]["sources"] = [k for k in params["tokenizer"]["sources"]
                                          if k in params["pack"]["sources"]]
        for src in params["pack"]["sources"].values():
            src.pop("max_tokens", None)
        for phase in ("pretrain", "midtrain", "sft"):   # blends must name existing sources
            if phase in params:
                params[phase]["blend"] = {k: w for k, w in params[phase]["blend"].items()
                                          if k in params["pack"]["sources"]} or {"code": 1.0}
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        results[size] = {}
        for stage in args.stages.split(","):
            results[size][stage] = r = run_stage(stage, work / "params.yaml", work)
            print(f"{size:6s} {stage:10s} {r['seconds']:7.1f} s {r['peak_rss_mb']:6d} MB "
                  f"records={r['records']}", flush=True)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)])
    sizes = list(results)
    head = "| stage | " + " | ".join(f"{s}: s / MB / records" for s in sizes) + " |"
    print("\n" + head + "\n|---|" + "---|" * len(sizes))
    for stage in args.stages.split(","):
        cells = [f"{results[s][stage]['seconds']} / {results[s][stage]['peak_rss_mb']} / "
                 f"{results[s][stage]['records']}" for s in sizes]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
