"""A small but real training setup shared by the tokenizer, pack and training tests: shard
datasets of real stdlib code, CWM-format traces and agent trajectories, a params.yaml for a
tiny model, and (built once per session) the tokenizer and pack stages' outputs."""

from __future__ import annotations

import hashlib
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


# --- RL (tests/test_rl.py): programs traced in the sandbox, an agent task, a tiny stand-in SFT

CALC = '''\
def mean(xs):
    total = 0
    for x in xs:
        total += x
    return total / len(xs)


def double(x):
    return x * 2
'''
CALC_TESTS = '''\
from calc import double, mean


def test_mean():
    assert mean([1, 2, 3, 6]) == 3


def test_double():
    assert double(2) == 4
'''


def rl_program_records(n: int = 40) -> list[dict]:
    """Tiny programs (parity of an int) traced by the traces stage's own sandbox runner:
    records with code, call, result, status, prompt and trace as the traces stage writes them.
    Answers are "0" or "1", so a model trained briefly on them gets about half right."""
    from codeworld.config import TraceLimitsConfig
    from stages.trace_runner import trace_requests

    code = "def f(x):\n    y = x % 2\n    return y\n"
    reqs = [{"id": f"p{i}", "code": code, "call": f"f({i})"} for i in range(n)]
    runs = trace_requests(reqs, TraceLimitsConfig(wall_seconds=5, cpu_seconds=5), workers=1)
    out = []
    for i, (req, run) in enumerate(zip(reqs, runs)):
        assert run["status"] == "ok", run
        out.append({**req, **{k: run[k] for k in ("trace", "result", "status", "prompt", "error")},
                    "provenance": {"corpus_id": f"prog/{i}.py"}})
    return out


def calc_repo(root: Path) -> Path:
    """An agent environment: a folder with a package and its tests."""
    (root / "calc").mkdir(parents=True)
    (root / "calc" / "__init__.py").write_text(CALC)
    (root / "tests").mkdir()
    (root / "tests" / "test_calc.py").write_text(CALC_TESTS)
    return root


def calc_task() -> dict:
    """A mutate-fix task on calc_repo: `/` turned into `*` in mean (test_mean fails)."""
    start = CALC.encode().index(b"total / len")
    start += len("total ")
    return {"id": "calc-arith-0", "repo": "calc", "version": None, "sha256": None,
            "commit": None, "file": "calc/__init__.py", "line": 5, "operator": "change_arith",
            "mutation": {"start": start, "end": start + 1, "replacement": "*", "original": "/",
                         "file_sha256": hashlib.sha256(CALC.encode()).hexdigest()},
            "FAIL_TO_PASS": ["tests/test_calc.py::test_mean"],
            "PASS_TO_PASS": ["tests/test_calc.py::test_double"],
            "test_order": ["tests/test_calc.py::test_mean", "tests/test_calc.py::test_double"],
            "problem_statement": "FAILED tests/test_calc.py::test_mean\n"
                                 "E   assert 48.0 == 3\n"
                                 "Run the tests with: python -m pytest -q -p no:cacheprovider "
                                 "-o addopts= --tb=short"}


def build_rl_root(root: Path) -> Path:
    """Datasets (code, the traced programs, agent trajectories and one agent task), then the
    real tokenizer and pack stages, with an `sft_output` source the stand-in SFT trains on."""
    write_dataset(root, "dedup", code_records())
    write_dataset(root, "traces", rl_program_records())
    write_dataset(root, "agent", agent_records())
    write_dataset(root, "agent/tasks", [calc_task()])
    repo = calc_repo(root / "calc-repo")
    base = tiny_params(root)
    sources = {**base["pack"]["sources"], "sft_output": {"dataset": "traces", "format": "sft_output"}}
    params = tiny_params(
        root, pack={"sources": sources},
        agent={"repositories": [{"name": "calc", "path": str(repo)}]},
        model={"max_position_embeddings": 1024},   # room for the agent prompt
        # the "SFT" checkpoint RL starts from: answers of the programs above, briefly learnt
        pretrain={"blend": {"sft_output": 1.0}, "steps": 30, "seq_length": 64, "lr": 0.003,
                  "warmup_steps": 3, "save_interval": 30, "eval_interval": 30},
        rl={"init_from": "pretrain", "steps": 4, "prompts_per_step": 2, "group_size": 4,
            "max_new_tokens": 6, "seq_length": 128, "micro_batch_size": 4,
            "tasks": {"output": 1.0}, "pool_size": 16, "agent_interval": 2,
            "agent_group_size": 2, "agent_max_turns": 2, "agent_max_new_tokens": 8,
            "agent_seq_length": 768, "lr": 0.003, "min_lr": 0.003, "save_interval": 2})
    path = write_yaml(root / "params.yaml", params)
    for stage in ("tokenizer", "pack"):
        subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", stage, "--params",
                        str(path), "--no-track"], check=True, cwd=root, capture_output=True)
    return path


# --- the later phases (tests/test_phases.py) ---------------------------------------------

def sft_trace_records(n: int = 60) -> list[dict]:
    """trace_records with what output prediction needs (code, call, status, result) on two of
    three; the third raised (no output task); repository-style traces (no prompt) at the end."""
    out = []
    for i, rec in enumerate(trace_records(n)):
        if rec["id"] == "broken":
            out.append(rec)
            continue
        a, b = i % 7, i % 5 + 1
        rec.update(code=rec["prompt"].split("\ndef main")[0].removeprefix(CTX),
                   call=f"f({a}, {b})", error=None)
        if i % 3:
            rec.update(status="ok", result=repr(a * b + b - i % 3))
        else:
            rec.update(status="exception", result=None, error="ZeroDivisionError: x")
        out.append(rec)
    for i in range(4):
        out.append({"id": f"repo{i}", "trace": f"{CALL}{{}}{ACT}def g():\n{FRAME}",
                    "status": "ok", "result": "None", "module": "pkg",
                    "provenance": {"repo": "demo", "generator": "repository"}})
    return out


def phase_params(root: Path, **sections) -> dict:
    """tiny_params with the SFT sources, a 5-trajectory agent source (too small to validate)
    and midtrain / sft sections."""
    params = tiny_params(root)
    params["pack"]["sources"].update({
        "agent_small": {"dataset": "agent_small", "format": "agent"},
        "sft_trace": {"dataset": "traces", "format": "sft_trace"},
        "sft_output": {"dataset": "traces", "format": "sft_output"},
        "sft_agent": {"dataset": "agent", "format": "sft_agent"}})
    params["pretrain"].update(steps=20, warmup_steps=2, save_interval=10, eval_interval=10)
    params["midtrain"] = {**params["pretrain"], "init_from": "pretrain", "steps": 2,
                          "seq_length": 64, "warmup_steps": 1, "save_interval": 2,
                          "eval_interval": 2, "blend": {"code": 1.0, "traces": 1.0,
                                                        "agent_small": 0.5}}
    params["sft"] = {**params["midtrain"], "init_from": "midtrain",
                     "blend": {"sft_trace": 1.0, "sft_output": 1.0, "sft_agent": 0.5}}
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    return params


def build_phase_root(root: Path) -> Path:
    """build_training_root's data with sft_trace_records and a small agent dataset, then the
    real tokenizer and pack stages with phase_params."""
    write_dataset(root, "dedup", code_records())
    write_dataset(root, "traces", sft_trace_records())
    write_dataset(root, "agent", agent_records())
    write_dataset(root, "agent_small", agent_records(5))
    params = write_yaml(root / "params.yaml", phase_params(root))
    for stage in ("tokenizer", "pack"):
        proc = subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", stage, "--params",
                               str(params), "--no-track"], cwd=root, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return params


# --- evaluation and the debugger (tests/test_evaluate.py, tests/test_debugger.py) ----------

EVAL_PROGRAMS = (
    ("def f(a, b):\n    c = a * 2 + b\n    return c\n", "f({i}, {j})"),
    ("def f(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total\n",
     "f([{i}, {j}])"),
    ("def f(n, k):\n    m = n - k\n    return 10 // m\n", "f({i}, {j})"),   # raises when i == j
    ("def g(x):\n    return x + 1\n\n\ndef f(a, b):\n    y = g(a)\n    return y * b\n",
     "f({i}, {j})"),
)


def eval_program_records(heldout_wanted: int = 6, total: int = 40, percent: float = 10.0) -> list[dict]:
    """Small programs traced by the traces stage's own sandbox runner (frames included), as
    the traces stage writes them; corpus ids chosen so that `heldout_wanted` of them fall in
    the held-out split of `percent` (pack.seed 0) and the rest in training."""
    from codeworld.config import TraceLimitsConfig
    from codeworld.split import heldout
    from stages.trace_runner import trace_requests

    ids, held, n = [], 0, 0
    while len(ids) < total:
        cid = f"evalprog/{n}.py"
        n += 1
        is_held = heldout(cid, percent, 0)
        if is_held and held >= heldout_wanted or not is_held and len(ids) - held >= total - heldout_wanted:
            continue
        held += is_held
        ids.append(cid)
    reqs = []
    for k, cid in enumerate(ids):
        code, call = EVAL_PROGRAMS[k % len(EVAL_PROGRAMS)]
        reqs.append({"id": f"e{k}", "code": code, "call": call.format(i=k % 5, j=k % 3 + 1)})
    runs = trace_requests(reqs, TraceLimitsConfig(wall_seconds=5, cpu_seconds=5), workers=1,
                          frames=True)
    out = []
    for cid, req, run in zip(ids, reqs, runs):
        assert run["status"] in ("ok", "exception"), run
        out.append({**req, **{k: run[k] for k in ("trace", "result", "status", "prompt", "error",
                                                  "frames", "events")},
                    "provenance": {"corpus_id": cid, "generator": "function"}})
    return out


def build_eval_root(root: Path, **sections) -> Path:
    """Code, real traced programs (+ the synthetic traces), agent trajectories; the real
    tokenizer, pack and pretrain stages (4 steps of the tiny model) in subprocesses."""
    write_dataset(root, "dedup", code_records())
    write_dataset(root, "traces", eval_program_records() + trace_records())
    write_dataset(root, "agent", agent_records())
    params = write_yaml(root / "params.yaml", tiny_params(root, **sections))
    for stage in ("tokenizer", "pack", "pretrain"):
        proc = subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", stage, "--params",
                               str(params), "--no-track"], cwd=root, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return params
