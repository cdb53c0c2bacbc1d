"""Prefect deployments of the pipeline flow: the whole pipeline and its parts.

    python -m flows.deploy list                 the deployments (JSON)
    python -m flows.deploy serve                serve them from this process (what `make serve` runs)
    python -m flows.deploy prefect-yaml [--check]   write (or check) prefect.yaml, for workers

Deployments of flow `codeworld-pipeline`, derived from dvc.yaml's stage names at start
(flows.pipeline.stage_groups), so a new stage joins its part without an edit here:

    all        every stage                               parameters {}
    data       corpus ... pack                           parameters {"group": "data"}
    train      pretrain and later phases                 parameters {"group": "train"}
    evaluate   evaluation and export stages (absent while dvc.yaml has none)

A part runs its stages and what they need (DVC skips what is up to date). Every deployment takes
`overrides`: `SECTION.KEY=VALUE` strings, as `dvc exp run -S` does, validated against the params
schema before anything runs, set in params.yaml for that run only; and `force` (rerun stages).

Two runs never share a workspace: each deployment has a concurrency limit of 1 (later runs
queue, ENQUEUE), `serve` runs one flow run at a time (limit=1), a Prefect global concurrency
limit of 1 slot per workspace is held by every run from a deployment (so two serving processes
or a worker also queue), and the flow holds a file lock on the workspace.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from codeworld.storage import StorageError, write_file_atomic
from flows.pipeline import dag_order, pipeline, stage_groups, workspace_limit_name

FLOW_NAME = "codeworld-pipeline"
ENTRYPOINT = "flows/pipeline.py:pipeline"
WORK_POOL = "codeworld"
# Default schedules (cron, UTC); `--cron NAME=EXPR` changes one, `--cron NAME=` removes it.
SCHEDULES = {"all": "0 3 * * *"}
DESCRIPTIONS = {
    "all": "The whole pipeline: every dvc.yaml stage in DAG order (DVC skips what is up to date).",
    "data": "The data stages (corpus to pack; every dvc.yaml stage that is not training or evaluation).",
    "train": "The training phases (stages writing data/checkpoints/) and the data stages they need.",
    "evaluate": "The evaluation and export stages (after training) and what they need.",
}


def specs(root: Path, schedules: dict[str, str] | None = None) -> list[dict]:
    """One dict per deployment: name, parameters, cron (or None), stages, description."""
    schedules = SCHEDULES if schedules is None else schedules
    dvc_yaml = root / "dvc.yaml"
    parts = {"all": dag_order(dvc_yaml), **stage_groups(dvc_yaml)}
    out = []
    for name, stages in parts.items():
        params = {"overrides": [], "force": False}
        if name != "all":
            params["group"] = name
        out.append({"name": name, "parameters": params, "cron": schedules.get(name) or None,
                    "stages": stages,
                    "description": DESCRIPTIONS[name]})
    return out


def _limit():
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def build(root: Path, schedules: dict[str, str] | None = None, paused: bool = False) -> list:
    """RunnerDeployments of the pipeline flow for `serve`."""
    from prefect.schedules import Cron

    return [pipeline.to_deployment(
        name=s["name"], parameters=s["parameters"],
        description=f"{s['description']} Stages today: {', '.join(s['stages'])}.",
        schedules=[Cron(s["cron"], timezone="UTC")] if s["cron"] else None,
        paused=paused, concurrency_limit=_limit(), tags=["codeworld", s["name"]])
        for s in specs(root, schedules)]


def ensure_workspace_limit(root: Path) -> str:
    """Create (or re-enable at 1 slot) the workspace's global concurrency limit."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    name = workspace_limit_name(root)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    return name


def serve_all(root: Path, schedules: dict[str, str] | None = None, paused: bool = False) -> None:
    """Serve every deployment from this process (one flow run at a time), in `root`."""
    from prefect import serve

    root = root.resolve()
    os.chdir(root)  # flow runs start in the runner's working directory: the workspace
    limit = ensure_workspace_limit(root)
    print(f"workspace {root}: global concurrency limit {limit!r} (1 slot)", flush=True)
    serve(*build(root, schedules, paused), limit=1)


def prefect_yaml(root: Path, schedules: dict[str, str] | None = None) -> str:
    """prefect.yaml for `prefect deploy --all` (deployments on a `process` work pool, run by
    `prefect worker start --pool codeworld` from the repository root)."""
    deployments = []
    for s in specs(root, schedules):
        d = {"name": s["name"], "description": s["description"], "entrypoint": ENTRYPOINT,
             "tags": ["codeworld", s["name"]], "parameters": s["parameters"],
             "concurrency_limit": {"limit": 1, "collision_strategy": "ENQUEUE"},
             "work_pool": {"name": WORK_POOL, "work_queue_name": "default"},
             "schedules": [{"cron": s["cron"], "timezone": "UTC", "active": True}] if s["cron"] else []}
        deployments.append(d)
    head = ("# Generated by `python -m flows.deploy prefect-yaml` from dvc.yaml (tests check it is\n"
            "# current). For a worker: `prefect work-pool create codeworld --type process`, then from\n"
            "# the repository root `prefect deploy --all` and `prefect worker start --pool codeworld`.\n"
            "# `make serve` does not need it: it serves the same deployments with flow.serve.\n")
    body = {"name": "codeworld", "prefect-version": "3.9.1", "build": None, "push": None,
            "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}],
            "deployments": deployments}
    return head + yaml.safe_dump(body, sort_keys=False, width=100)


def _schedules(items: list[str] | None) -> dict[str, str]:
    """SCHEDULES with the --cron changes; a deployment name or cron expression that is not
    one is refused before anything is served or written (else it was silently dropped)."""
    out = dict(SCHEDULES)
    for item in items or []:
        name, sep, expr = item.partition("=")
        if not sep:
            raise SystemExit(f"--cron {item!r}: expected NAME=CRON (NAME= removes a schedule)")
        if name not in DESCRIPTIONS:
            raise SystemExit(f"--cron {item!r}: no deployment {name!r} (deployments: "
                             f"{', '.join(DESCRIPTIONS)})")
        if expr.strip():
            from prefect.client.schemas.schedules import CronSchedule   # only with a --cron
            from pydantic import ValidationError

            try:
                CronSchedule(cron=expr.strip(), timezone="UTC")
            except ValidationError:
                raise SystemExit(f"--cron {item!r}: {expr.strip()!r} is not a cron expression "
                                 "(minute hour day-of-month month day-of-week)") from None
        out[name] = expr.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["list", "serve", "prefect-yaml"])
    p.add_argument("--root", default=".", help="the workspace (repository root)")
    p.add_argument("--cron", action="append", help="NAME=CRON: a deployment's schedule (UTC)")
    p.add_argument("--paused", action="store_true", help="serve with schedules paused")
    p.add_argument("--check", action="store_true", help="prefect-yaml: fail if prefect.yaml is stale")
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    schedules = _schedules(args.cron)
    if args.command == "list":
        print(json.dumps(specs(root, schedules), indent=2))
    elif args.command == "serve":
        serve_all(root, schedules, args.paused)
    else:
        text, target = prefect_yaml(root, schedules), root / "prefect.yaml"
        if args.check:
            if not target.exists() or target.read_text() != text:
                print(f"{target} is stale: run `python -m flows.deploy prefect-yaml`", file=sys.stderr)
                return 1
        else:
            # atomic: `prefect deploy --all` must never read half a file (a full disk)
            try:
                write_file_atomic(target, text.encode())
            except StorageError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
