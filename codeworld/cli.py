"""`codeworld`: one console script, a subcommand per stage.

    codeworld stage NAME            run a dvc.yaml stage from params.yaml (what DVC calls)
    codeworld pipeline              run the whole pipeline as a Prefect flow (dvc repro per stage)
    codeworld corpus SRC... OUT     ad hoc: ingest folders / JSONL / git@commit / s3:// into shards
    codeworld dedup IN OUT          ad hoc: dedup JSONL ({"id","text"} lines) or a shard dataset
    codeworld trace IN OUT          ad hoc: trace JSONL programs in the sandbox (CWM format)
    codeworld debug FILE --call C   the neural debugger: predicted frames beside the real ones
    codeworld export --checkpoint D --out F   ad hoc: a checkpoint as a Hugging Face folder, checked
    codeworld check-params          validate params.yaml and print the resolved config
    codeworld send-steps [PHASE...] send MLflow the training steps (and run closes, of every
                                    stage) an outage kept from it, without running the stages
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from codeworld.config import ConfigError, StageFailed, load_params

EXIT_BAD_INPUT = 2
EXIT_TRANSIENT = 75  # EX_TEMPFAIL: the flow retries these


# Option types: a bad value is refused by argparse with the flag's name, before any work,
# instead of by a pydantic model or a library deep inside the command.
def _option(convert, ok, requirement: str):
    """An argparse type: `convert` the text, and refuse a value for which `ok` is false."""
    noun = "an integer" if convert is int else "a number"

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
        if not ok(value):   # (NaN fails every comparison, so every check)
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return parse


_positive_int = _option(int, lambda v: v >= 1, "at least 1")
_count = _option(int, lambda v: v >= 0, "0 or more")   # 0: the option's default behaviour
_seconds = _option(float, lambda v: v > 0 and math.isfinite(v), "a positive number of seconds")
_fraction = _option(float, lambda v: 0 < v <= 1, "in (0, 1]")


STAGES = ("corpus", "dedup", "traces", "tokenizer", "pack", "pretrain", "midtrain", "sft", "rl", "agent", "evaluate", "export")  # each is stages/<name>.py with run(params, track=...)


# stages whose output is no shard dataset; each returns what pins its content (file or
# summary checksums), which the copy in data/NAME carries
PINNED_ON_S3 = ("tokenizer", "pack", "evaluate", "export")


def _stage(args: argparse.Namespace) -> int:
    import importlib

    from codeworld.shards import pin_manifest
    from codeworld.storage import Storage

    params = load_params(args.params)
    if args.name not in STAGES:
        raise ConfigError(f"unknown stage {args.name!r} (known: {', '.join(STAGES)})")
    m = importlib.import_module(f"stages.{args.name}").run(params, track=not args.no_track)
    # With the data elsewhere, DVC's data/NAME is a copy of the output's manifest: for a shard
    # dataset, and for the other outputs once they are on S3 (on a local disk they are
    # written where the storage root is, and the training phases read them there); without
    # it `dvc repro` ends with "output 'data/NAME' does not exist".
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    if "shards" in m or (args.name in PINNED_ON_S3 and storage.is_s3):
        pin_manifest(storage, args.name, m)
    print(json.dumps({"stage": args.name, "records": m.get("records"),
                      "shards": len(m.get("shards", []))}))
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    import os

    from codeworld.tracking import repo_root

    load_params(repo_root() / "params.yaml")  # a bad param fails in a second, before Prefect starts
    _known_stages(repo_root() / "dvc.yaml", args.stage or [])   # and so does a misspelt --stage
    # Prefect's temporary server may need more than its default 20 s on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The temporary server's usage telemetry needs the internet: offline (CI, clusters) it logged
    # an ERROR every few minutes of a run. `make serve` (flows/serve.py) turns it off the same way.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.pipeline import pipeline

    pipeline(stages=args.stage or None, force=args.force)
    return 0


def _known_stages(dvc_yaml: Path, names: list[str]) -> None:
    """ConfigError naming the stages `dvc_yaml` has when one of `names` is none of them (the
    flow would find out only after Prefect's temporary server had started)."""
    import yaml

    try:
        known = list((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {})
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{dvc_yaml}: cannot read the pipeline's stages: {err}") from None
    if unknown := [n for n in names if n not in known]:
        raise ConfigError(f"--stage {', '.join(unknown)}: no such stage in {dvc_yaml} "
                          f"(its stages: {', '.join(known)})")


def _same_path(a: str, b: str) -> bool:
    """Do two paths name one file or folder? Local paths resolved (".." and symlinks) and
    compared by inode when both exist (hard links); s3:// URLs as text."""
    if a.startswith("s3://") or b.startswith("s3://"):
        return a.rstrip("/") == b.rstrip("/")
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra == rb or (ra.exists() and rb.exists() and ra.samefile(rb))


def _distinct(inputs: list[tuple[str, str]], outputs: list[tuple[str, str]]) -> None:
    """Refuse, before any work, an output (label, path) that is an input or another output:
    the output is written whole over it (an input read away, a report over the records)."""
    for i, (label, path) in enumerate(outputs):
        for other_label, other in inputs + outputs[:i]:
            if _same_path(path, other):
                raise ConfigError(f"{label} {path} is the same path as {other_label} {other}: "
                                  "it would be overwritten; choose another path")


def _corpus(args: argparse.Namespace) -> int:
    from stages.adhoc import corpus_adhoc

    # REPO@COMMIT names the folder REPO (as stages.adhoc reads it: when no such path exists)
    paths = [a.rsplit("@", 1)[0] if "@" in a and not Path(a).exists() else a for a in args.sources]
    _distinct([("source", p) for p in paths], [("output", args.out)])
    m = corpus_adhoc(args.sources, args.out, extensions=args.ext, max_bytes=args.max_bytes,
                     workers=args.workers)
    print(json.dumps({"records": m["records"], "shards": len(m["shards"]),
                      "counts": m["stats"]["counts"]}))
    return 0


def _dedup(args: argparse.Namespace) -> int:
    from stages.adhoc import dedup_adhoc

    report_path = args.report or f"{args.output.rstrip('/')}.report.json"   # dedup_adhoc's default
    _distinct([("input", args.input)], [("output", args.output), ("report", report_path)])
    report = dedup_adhoc(args.input, args.output, report_path=report_path,
                         threshold=args.threshold, workers=args.workers)
    print(json.dumps({k: report["stats"][k] for k in ("documents", "kept", "removed_exact", "removed_near")}
                     | {"bad_records": len(report.get("bad_records", [])), "report": report["path"]}))
    return 0


def _trace(args: argparse.Namespace) -> int:
    from stages.adhoc import trace_adhoc

    _distinct([("input", args.input)], [("output", args.output)])
    counts = trace_adhoc(args.input, args.output, workers=args.workers,
                         wall_seconds=args.timeout, max_events=args.max_events)
    print(json.dumps(counts))
    return 0


def _export(args: argparse.Namespace) -> int:
    from stages.adhoc import export_adhoc

    _distinct([("checkpoint", args.checkpoint)], [("output", args.out)])
    m = export_adhoc(load_params(args.params), args.checkpoint, args.out)
    print(json.dumps({k: m[k] for k in ("records", "logits_max_abs_diff", "greedy_equal",
                                        "greedy_near_ties", "programs") if k in m}
                     | {"output": args.out}))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from codeworld import compare

    _distinct([], [(flag, path) for flag, path in (("--csv", args.csv), ("--plot", args.plot)) if path])
    params = load_params(args.params)
    try:
        if args.plot:
            compare.plot_format(Path(args.plot))   # a bad --plot path is refused before the queries
        cols = compare.columns_for(args.experiment or params.tracking.experiment,
                                   runs=args.runs, pipelines=args.pipelines)
        rows = compare.metric_rows(cols, args.metric)
        print(compare.markdown(cols, rows))
        if args.csv:
            compare.write_csv(cols, rows, Path(args.csv))
        if args.plot:
            what = compare.plot(cols, rows, Path(args.plot))
            print(f"\nplot: {args.plot} ({what})")
    except compare.CompareError as err:
        raise ConfigError(str(err)) from None
    return 0


def _register(args: argparse.Namespace) -> int:
    from codeworld.registry import RegistryError, register_final

    try:
        print(json.dumps(register_final(load_params(args.params), args.name)))
    except RegistryError as err:
        raise ConfigError(str(err)) from None
    return 0


def _debug(args: argparse.Namespace) -> int:
    from codeworld.debugger import DebugError, start

    color = {"always": True, "never": False}.get(args.color, sys.stdout.isatty())
    try:
        session = start(args.file, args.call, load_params(args.params), checkpoint=args.checkpoint,
                        hf=args.hf, wall_seconds=args.timeout, max_new_tokens=args.max_new_tokens,
                        color=color)
    except (DebugError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    session.run(sys.stdin)
    return 0


def _send_steps(args: argparse.Namespace) -> int:
    """What the tracking server missed of each training phase (its steps.jsonl.unsent): the
    steps of a torchrun started by hand on the phase's folder, which no stage sends after it,
    and closes of stage runs. Under the phase's lock: never beside a stage sending the same."""
    from codeworld.config import PHASES
    from model.metrics import unsent_path
    from stages.train_phase import STEPS, phase_dir, phase_lock, send_unsent_steps

    known = (*PHASES, "rl")
    if bad := [p for p in args.phase if p not in known]:
        raise ConfigError(f"unknown phase {bad[0]!r} (known: {', '.join(known)})")
    params = load_params(args.params)
    targets = [(phase, phase_dir(params, phase)) for phase in args.phase or
               ([] if args.steps_log else known)]
    for phase, out in targets:
        if not unsent_path(out / STEPS).exists():
            print(f"{phase}: nothing unsent ({out / STEPS})")
            continue
        with phase_lock(out):
            send_unsent_steps(out / STEPS)
        print(f"{phase}: sent ({out / STEPS})")
    for steps in map(Path, args.steps_log):   # a hand-run's --steps-log outside a phase folder
        if not unsent_path(steps).exists():
            print(f"{steps}: nothing unsent")
            continue
        send_unsent_steps(steps)
        print(f"{steps}: sent")
    if not args.phase and not args.steps_log:   # and the other stages' runs left open
        _send_stage_closes()
    return 0


def _send_stage_closes() -> None:
    """End the runs of the non-training stages whose close an outage kept (tracking.StageRun):
    a server still down is TrackingUnavailable (exit 75)."""
    from codeworld.tracking import send_stage_closes, stage_closes_path, tracking_server

    if not stage_closes_path().exists():
        print(f"stages: nothing unsent ({stage_closes_path()})")
        return
    with tracking_server():
        closed = send_stage_closes()
    print(f"stages: closed {len(closed)} MLflow runs ({stage_closes_path()})")


def _check(args: argparse.Namespace) -> int:
    if args.undo_killed_overrides:
        import contextlib

        from codeworld.overrides import undo_overrides_outside_a_flow

        with contextlib.redirect_stdout(sys.stderr):   # what it did: stdout is the JSON
            undo_overrides_outside_a_flow(Path(args.params))
    print(json.dumps(load_params(args.params).model_dump(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codeworld", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("stage", help="run one dvc.yaml stage from params.yaml")
    s.add_argument("name")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    s.set_defaults(fn=_stage)

    s = sub.add_parser("pipeline", help="run the pipeline as a Prefect flow")
    s.add_argument("--stage", action="append", help="only these stages (and what they need)")
    s.add_argument("--force", action="store_true", help="rerun stages even if unchanged")
    s.set_defaults(fn=_pipeline)

    s = sub.add_parser("corpus", help="ingest sources into a shard dataset (ad hoc)")
    s.add_argument("sources", nargs="+", help="folder, FILE.jsonl, REPO@COMMIT, s3://prefix or a shard dataset")
    s.add_argument("out", help="output dataset folder or s3:// prefix")
    s.add_argument("--ext", action="append", help="extensions to keep (default .py)")
    s.add_argument("--max-bytes", type=_positive_int, default=1_000_000)
    s.add_argument("--workers", type=_positive_int, default=2)
    s.set_defaults(fn=_corpus)

    s = sub.add_parser("dedup", help="exact + near dedup of JSONL or a shard dataset (ad hoc)")
    s.add_argument("input", help="IN.jsonl ({\"id\", \"text\"} per line) or a shard dataset")
    s.add_argument("output", help="OUT.jsonl, or a dataset folder when IN is a dataset")
    s.add_argument("--report", help="report path (default: OUT + .report.json)")
    s.add_argument("--threshold", type=_fraction, default=0.7)
    s.add_argument("--workers", type=_positive_int, default=2)
    s.set_defaults(fn=_dedup)

    s = sub.add_parser("trace", help="trace programs in the sandbox, CWM format (ad hoc)")
    s.add_argument("input", help='IN.jsonl: {"id", "code", "input"[, "entry"]} or {"id", "code", "call"}')
    s.add_argument("output", help='OUT.jsonl: {"id", "trace", "result", "error", "status"} per line, same order')
    s.add_argument("--workers", type=_count, default=0, help="fork servers (default: every core)")
    s.add_argument("--timeout", type=_seconds, default=2.0, help="wall seconds per program")
    s.add_argument("--max-events", type=_positive_int, default=10_000)
    s.set_defaults(fn=_trace)

    s = sub.add_parser("export", help="a checkpoint as a Hugging Face folder, checked (ad hoc)")
    s.add_argument("--checkpoint", required=True,
                   help="a phase checkpoint directory (its latest.json), e.g. one trained by hand")
    s.add_argument("--out", required=True, help="output folder or s3:// prefix")
    s.add_argument("--params", default="params.yaml",
                   help="model shape, export checks, and the storage root whose tokenizer and "
                        "held-out traces the check uses")
    s.set_defaults(fn=_export)

    s = sub.add_parser("compare", help="MLflow runs side by side: phases, stages or pipeline runs")
    s.add_argument("--runs", nargs="+", metavar="RUN_ID", help="these runs")
    s.add_argument("--pipelines", type=_count, default=0, metavar="N",
                   help="the last N pipeline runs, one column each")
    s.add_argument("--metric", action="append", help="only these metrics (repeatable)")
    s.add_argument("--experiment", help="MLflow experiment (default: params tracking.experiment)")
    s.add_argument("--plot", help="write a plot here (PNG): loss curves, or a bar chart")
    s.add_argument("--csv", help="write the table here as CSV too")
    s.add_argument("--params", default="params.yaml")
    s.set_defaults(fn=_compare)

    s = sub.add_parser("register", help="register the final checkpoint in the MLflow model registry")
    s.add_argument("--name", help="registered model name (default: params tracking.registered_model)")
    s.add_argument("--params", default="params.yaml")
    s.set_defaults(fn=_register)

    s = sub.add_parser("debug", help="neural debugger: the model's frames beside the real ones")
    s.add_argument("file", help="a Python file")
    s.add_argument("--call", required=True, help='the call to trace, e.g. "f(1, 2)"')
    which = s.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="a phase checkpoint directory or one of its iter_N "
                       "(default: the last trained phase)")
    which.add_argument("--hf", metavar="FOLDER", help="a `codeworld export` folder instead, run "
                       "through transformers (no Megatron, no training data needed)")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--timeout", type=_seconds, default=5.0, help="wall seconds for the real run")
    s.add_argument("--max-new-tokens", type=_positive_int, default=4096, help="cap on predicted tokens")
    s.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    s.set_defaults(fn=_debug)

    s = sub.add_parser("send-steps", help="send MLflow the training steps an outage kept from "
                       "it (steps.jsonl.unsent): a hand-run torchrun's, without the stage; and "
                       "the run closes it missed (mlflow.unclosed.json)")
    s.add_argument("phase", nargs="*", help="phases (default: all, and the other stages' run "
                   "closes, unless --steps-log)")
    s.add_argument("--steps-log", action="append", default=[], metavar="FILE",
                   help="a torchrun's --steps-log outside the phase folders (repeatable)")
    s.add_argument("--params", default="params.yaml")
    s.set_defaults(fn=_send_steps)

    s = sub.add_parser("check-params", help="validate params.yaml")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--undo-killed-overrides", action="store_true",
                   help="first put params.yaml back as it was before the overrides of a flow "
                        "run that was killed (as the next `codeworld pipeline` does)")
    s.set_defaults(fn=_check)
    return p


def _input_error(err: BaseException) -> str:
    """The one-line message for an input error that is not one of codeworld's own."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        fields = [f"{'.'.join(map(str, e['loc'])) or err.title}: {e['msg']} "
                  f"(got {repr(e.get('input'))[:80]})" for e in err.errors()]
        return "invalid value: " + "; ".join(fields)
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text: {err}"
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "alembic", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from codeworld.sandbox import SandboxUnavailable
    from codeworld.shards import ShardError
    from codeworld.storage import BAD_PATH_ERRORS, StorageError
    from stages.corpus_sources import SourceError

    try:
        # A killed flow's overrides still in params.yaml are no values of this run's: refused
        # (the flow itself puts them back, under its lock; check-params can, when asked).
        if getattr(args, "params", None) and args.cmd != "pipeline" and \
                not getattr(args, "undo_killed_overrides", False):
            from codeworld.overrides import refuse_killed_overrides

            refuse_killed_overrides(Path(args.params))
        return args.fn(args)
    except (ConfigError, ShardError, SourceError, SandboxUnavailable) as err:
        print(f"codeworld {args.cmd}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ConnectionError, TimeoutError) as err:
        print(f"codeworld {args.cmd}: transient error (retry): {err}", file=sys.stderr)
        return EXIT_TRANSIENT
    except StageFailed as err:   # a training run that failed (its log's tail), a held lock...
        if getattr(err, "transient", False):   # a pipeline stage that failed its retries too
            print(f"codeworld {args.cmd}: transient error (retry): {err}", file=sys.stderr)
            return EXIT_TRANSIENT
        print(f"codeworld {args.cmd}: error: {err}", file=sys.stderr)
        return 1
    except StorageError as err:   # its message names the path
        if err.transient:   # decided where it was raised (a worker's cause does not come back)
            print(f"codeworld {args.cmd}: transient error (retry): {err}", file=sys.stderr)
            return EXIT_TRANSIENT
        print(f"codeworld {args.cmd}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # Errors of the user's paths and option values, raised below the commands (a missing or
    # unreadable input, a folder where a file belongs, a value a config model refuses). Other
    # exceptions keep their traceback: they are bugs. So do these in `stage` and `pipeline`,
    # whose files are the pipeline's own (params.yaml is checked by load_params).
    except (*BAD_PATH_ERRORS, UnicodeDecodeError, ValidationError) as err:
        if args.cmd in ("stage", "pipeline"):
            raise
        print(f"codeworld {args.cmd}: error: {_input_error(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
