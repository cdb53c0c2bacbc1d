"""Stage `rl`: GRPO with verifiable rewards, from the `rl.init_from` phase's final checkpoint
(params `rl`; the loop is model/rl.py, the tasks and rewards stages/rl_tasks.py).

Like the other phases (stages/train_phase.py): `checkpoints/rl` holds the checkpoints,
`steps.jsonl`, `run.json` (fingerprint and parent checkpoint) and `pool.jsonl`, the task pool
with the answers the sandbox gave, made once per fingerprint (a resumed run reuses it). A rerun
with the same fingerprint resumes from the latest checkpoint or returns at once; another
starts over. The fingerprint covers the rl and model params, the parent checkpoint, the traces
and agent-task datasets, the tokenizer, the split, the sandbox settings that can change the
pool (SANDBOX_FIELDS) and the code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from codeworld.code import Code
from codeworld.config import ConfigError, Params
from codeworld.shards import fingerprint
from codeworld.storage import Storage, write_file_atomic
from model import checkpoint
from stages import train_phase
from stages.rl_figures import summary
from stages.tokenizer import recorded_sha256
from stages.train_phase import (PARAMS, _set_tags, open_phase, phase_dir, phase_run,
                                read_steps, resolved_precision, resume_point, train, write_plot)

# As train_phase.CODE, with model.rl as the torchrun entry (its imports: generate, grpo, ...).
CODE = Code(("stages.rl", "model.rl"), skip=("model.launch",))

POOL = "pool.jsonl"
POOL_STATS = "pool_stats.json"


def parent_record(params: Params) -> dict:
    """The finished checkpoint of rl.init_from (the initial policy)."""
    return train_phase.parent_record(params, "rl")


def _manifest_fp(storage: Storage, name: str) -> str | None:
    try:
        return json.loads(storage.sub(name).read_bytes("manifest.json"))["fingerprint"]
    except FileNotFoundError:
        return None


# The agent params the episodes use (model/rl.py reads each as acfg.<field>; a test checks it
# reads no other): a change of one starts RL over.
AGENT_FIELDS = ("repositories", "max_tokens", "tool_wall_seconds", "test_wall_seconds",
                "max_workdir_mb")


# The sandbox settings (params traces) the pool's answers are checked under (stages/rl_tasks.py
# reads these and workers; a test checks it reads no other). limits: a program over one is
# dropped. batch_size and isolation: with isolation "shared" a batch's programs run in one
# process, and a program can change its neighbours' state (decimal's precision, os.environ,
# cwd), so which programs share a batch can change a rerun's answer and with it which items
# the pool keeps (the traces stage's fingerprint holds both for the same reason). All three
# are in the fingerprint and in dvc.yaml's params of stage rl. workers is in neither: the
# batches follow the input order only, so any number of fork servers gives the same results
# (codeworld/sandbox/forkserver.map_requests), as the traces stage's fingerprint also says.
SANDBOX_FIELDS = ("limits", "batch_size", "isolation")


def rl_fingerprint(params: Params, parent: dict, tokenizer_sha256: str | None = None,
                   precision: str | None = None) -> str:
    """`tokenizer_sha256`: what the stage read once (recorded_sha256) for this run's fingerprint
    and its run.json alike; `precision`: the one check_machine resolved ("auto" as fp32, bf16
    or fp8 on this machine). Each read or resolved here when not given (model/launch.py)."""
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    tok = tokenizer_sha256 if tokenizer_sha256 is not None else recorded_sha256(storage)
    traces = _manifest_fp(storage, "traces")
    if traces is None:
        raise FileNotFoundError(f"{storage.path('traces')}: no traces dataset (run the traces stage)")
    tasks = _manifest_fp(storage, "agent/tasks") if params.rl.agent_interval else None
    agent = params.agent.model_dump(include=set(AGENT_FIELDS))
    return fingerprint(CODE, "rl", 1, params.model.model_dump(), params.rl.model_dump(), tok, traces,
                       tasks, agent, params.traces.model_dump(include=set(SANDBOX_FIELDS)),
                       [params.pack.heldout_percent, params.pack.seed],
                       [parent["fingerprint"], parent["iteration"]],
                       precision if precision is not None else resolved_precision(params.rl))


def torchrun_command(params: Params, out: Path, parent: dict) -> list[str]:
    write_file_atomic(out / PARAMS, json.dumps(params.model_dump()).encode())
    from model import launch

    # one node or several (rendezvous from the environment): model/launch.py decides
    return launch.torchrun_command(params, "rl")   # --init-from: the parent phase's directory


def run(params: Params, *, track: bool = True, metrics_path: str | None = "metrics/rl.json",
        plot_path: str | None = "metrics/plots/rl.json") -> dict:
    if params.rl is None:
        raise ConfigError("params has no rl section: the rl phase is not configured")
    from model.build import check_machine
    from model.rl import check_rl_layout

    cfg = params.rl
    check_rl_layout(params)   # before any work: sampling needs each process's whole model
    # a precision or backend this machine lacks fails now too; the precision it resolves is
    # the fingerprint's (resolved once)
    precision = check_machine(params, "rl").name
    out = phase_dir(params, "rl")
    parent = parent_record(params)
    # read once: the fingerprint and run.json name the same tokenizer (rl needs one: no None)
    tokenizer_sha256 = recorded_sha256(Storage(params.storage.root, params.storage.s3_endpoint_url))
    fp = rl_fingerprint(params, parent, tokenizer_sha256, precision)
    with phase_run(out, "rl", params.model_dump(include={"model", "parallel", "rl"}),
                   params.tracking.experiment, metrics_path, track) as (run_, lock_fd):
        _set_tags(run_, {f"codeworld.parent_{k}": str(v) for k, v in parent.items()})
        record = {"phase": "rl", "fingerprint": fp, "parent": parent, "mlflow_run_id": run_.run_id,
                  "tokenizer_sha256": tokenizer_sha256}
        open_phase(out, record)
        if not (out / POOL).exists():   # written last (atomically): present means complete
            from stages.tokenizer import load as load_tokenizer
            from stages.rl_tasks import prepare_pool

            with run_.timed("pool"):
                tok = load_tokenizer(Storage(params.storage.root, params.storage.s3_endpoint_url),
                                     tokenizer_sha256)   # the one the fingerprint names
                stats = prepare_pool(params, tok, out / POOL.replace(".jsonl", ".tmp.jsonl"))
            write_file_atomic(out / POOL_STATS, json.dumps(stats, sort_keys=True).encode() + b"\n")
            os.replace(out / POOL.replace(".jsonl", ".tmp.jsonl"), out / POOL)
        stats = json.loads((out / POOL_STATS).read_text())
        run_.log(**{k: v for k, v in stats.items() if k.startswith(("pool_", "sandbox_"))})
        done = resume_point(out, "rl")
        if done is None or done[0] < cfg.steps:
            train(params, "rl", out, torchrun_command(params, out, parent), run_, lock_fd)
        rows = read_steps(out)
        result = summary(rows)
        run_.log(**{k: v for k, v in result.items() if isinstance(v, (int, float))})
        if plot_path:
            write_plot(rows, plot_path)
        final = checkpoint.latest(out)
        return {"name": "rl", "fingerprint": fp, "records": result.get("steps", 0),
                "checkpoint": str(final[1]) if final else None, "stats": result,
                "pool": stats, "parent": parent}
