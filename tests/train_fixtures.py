"""A small but real training setup shared by the tokenizer, pack and training tests: shard
datasets of real stdlib code, CWM-format traces and agent trajectories, a params.yaml for a
tiny model, and (built once per session) the tokenizer and pack stages' outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

from codeworld.shards import DatasetWriter
from codeworld.storage import Storage
from codeworld.tokens import TRACE_TOKENS

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CTX, FRAME, CALL, LINE, RET, EXC, ACT, ARG = TRACE_TOKENS


def code_records() -> list[dict]:
    files = sorted([*STDLIB.glob("json/*.py"), *STDLIB.glob("email/*.py"),
                    *STDLIB.glob("importlib/*.py")])
    return [{"id": f"stdlib/{p.relative_to(STDLIB)}", "text": p.read_text()} for p in files]


def trace_records(n: int = 60) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i % 7, i % 5 + 1
        src = f"def f(a, b):\n    c = a * {b} + b\n    return c - {i % 3}\n"
        c = a * b + b
        prompt = f"{CTX}{src}\ndef main():\n    return f({a}, {b})\n{FRAME}"
        trace = (f"{LINE}{{}}{ACT}    return f({a}, {b})\n{FRAME}"
                 f"{CALL}{{\"a\": \"{a}\", \"b\": \"{b}\"}}{ACT}def f(a, b):\n{FRAME}"
                 f"{LINE}{{\"a\": \"..\", \"b\": \"..\"}}{ACT}    c = a * {b} + b\n{FRAME}"
                 f"{LINE}{{\"a\": \"..\", \"b\": \"..\", \"c\": \"{c}\"}}{ACT}    return c - {i % 3}\n{FRAME}"
                 f"{RET}{ACT}    return c - {i % 3}\n{ARG}\"{c - i % 3}\"{FRAME}")
        out.append({"id": f"t{i}", "prompt": prompt, "trace": trace,
                    "provenance": {"corpus_id": f"prog/{i}.py"}})
    out.append({"id": "broken", "trace": 42, "provenance": {"corpus_id": "prog/broken.py"}})
    return out


def agent_records(n: int = 60) -> list[dict]:
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "Fix the bug; tools: bash, edit, create, submit."},
                    {"role": "user", "content": f"test_{i} fails: assert add(2, 2) == 4"}]
        for t in range(3):
            messages.append({"role": "assistant", "content": f"<tool: bash>\npytest -q -k t{t}\n</tool>"})
            messages.append({"role": "tool", "content": f"FAILED test_{i}.py::t{t} - AssertionError " * 3})
        messages.append({"role": "assistant", "content": "<tool: submit>\n</tool>"})
        out.append({"id": f"a{i}", "messages": messages, "reward": i % 2,
                    "provenance": {"repository": "demo"}})
    return out


def write_dataset(root: Path, name: str, records: list[dict], per_shard: int = 25) -> None:
    writer = DatasetWriter(Storage(str(root)), name, f"test-{name}")
    writer.prepare()
    infos = [writer.write(i, records[s:s + per_shard])
             for i, s in enumerate(range(0, len(records), per_shard))]
    writer.finish(infos)


def tiny_params(root: Path, **sections) -> dict:
    params = {
        "storage": {"root": str(root)},
        "tokenizer": {"vocab_size": 600, "sources": ["code", "traces", "agent"], "max_chars": 0},
        "pack": {"sources": {"code": {"dataset": "dedup", "format": "code"},
                             "traces": {"dataset": "traces", "format": "trace"},
                             "agent": {"dataset": "agent", "format": "agent",
                                       "observation_mask": 0.5}},
                 "heldout_percent": 10.0},
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                  "num_query_groups": 2, "ffn_hidden_size": 128, "max_position_embeddings": 256},
        "pretrain": {"blend": {"code": 1.0, "traces": 0.5}, "steps": 4, "seq_length": 32,
                     "micro_batch_size": 2, "global_batch_size": 4, "warmup_steps": 1,
                     "lr": 0.003, "save_interval": 2, "eval_interval": 2, "eval_iters": 1},
    }
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    return params


def write_yaml(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params))
    return path


def build_training_root(root: Path) -> Path:
    """Datasets, then the real tokenizer and pack stages (in a subprocess, as DVC runs them)."""
    write_dataset(root, "dedup", code_records())
    write_dataset(root, "traces", trace_records())
    write_dataset(root, "agent", agent_records())
    params = write_yaml(root / "params.yaml", tiny_params(root))
    for stage in ("tokenizer", "pack"):
        subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", stage, "--params",
                        str(params), "--no-track"], check=True, cwd=root, capture_output=True)
    return params


def pack_manifest(root: Path) -> dict:
    return json.loads((root / "pack" / "manifest.json").read_text())
