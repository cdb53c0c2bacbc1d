"""`codeworld compare`: MLflow runs side by side (mlflow.search_runs) and a plot.

    codeworld compare                    the latest pipeline run's stages and phases
    codeworld compare --pipelines 3      the last 3 pipeline runs (experiments), stage by stage
    codeworld compare --runs ID ID ...   any runs
    ... [--metric final_loss ...] [--plot compare.png] [--csv out.csv]

Columns are runs, rows are metrics (and the git commit); runs that share a name (the same
phase of two pipeline runs) are told apart by a short run id. For training phases the plot
draws each run's per-step loss; otherwise a bar chart of the first metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

# Shown first when present; every other metric follows alphabetically.
KEY_METRICS = ("final_loss", "final_valid_loss", "first_loss", "loss_fell", "tokens_per_s_median",
               "steps", "records", "seconds_total")


class CompareError(ValueError):
    pass


@dataclass
class Column:
    run_id: str
    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def _client():
    import mlflow
    from mlflow.tracking import MlflowClient

    from codeworld.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient()


def _experiment_id(client, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise CompareError(f"MLflow experiment {experiment!r} does not exist at this tracking URI "
                           "(run the pipeline first, or pass --experiment)")
    return exp.experiment_id


def _column(run, label: str | None = None) -> Column:
    return Column(run.info.run_id, label or run.data.tags.get("mlflow.runName", run.info.run_id[:8]),
                  dict(run.data.metrics), dict(run.data.tags))


def _children(client, exp_id: str, parent_id: str) -> list:
    runs = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              order_by=["attributes.start_time ASC"], max_results=200)
    return list(runs)


def pipeline_runs(client, exp_id: str, n: int) -> list:
    runs = client.search_runs([exp_id], "tags.`mlflow.runName` = 'pipeline'",
                              order_by=["attributes.start_time DESC"], max_results=n)
    if not runs:
        raise CompareError("no pipeline run in this experiment yet (run `codeworld pipeline`)")
    return list(runs)


def _run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        # a run id that names no run is the user's error; any other failure (the server) is not
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise CompareError(f"--runs {run_id}: no such MLflow run at this tracking URI") from None


def labelled(cols: list[Column]) -> list[Column]:
    """The columns, a name that two runs share suffixed with each one's short run id (the
    same phase of two pipeline runs: `midtrain (1a2b3c4d)`, `midtrain (5e6f7a8b)`)."""
    runs_of: dict[str, set[str]] = {}
    for c in cols:
        runs_of.setdefault(c.name, set()).add(c.run_id)
    return [Column(c.run_id, f"{c.name} ({c.run_id[:8]})", c.metrics, c.tags)
            if len(runs_of[c.name]) > 1 else c for c in cols]


def columns_for(experiment: str, *, runs: list[str] | None = None, pipelines: int = 0) -> list[Column]:
    return labelled(_columns_for(experiment, runs=runs, pipelines=pipelines))


def _columns_for(experiment: str, *, runs: list[str] | None = None, pipelines: int = 0) -> list[Column]:
    client = _client()
    exp_id = _experiment_id(client, experiment)
    if runs:
        return [_column(_run(client, r)) for r in runs]
    if pipelines:
        # one column per pipeline run: each stage's metrics prefixed with the stage name
        cols = []
        for parent in reversed(pipeline_runs(client, exp_id, pipelines)):
            col = _column(parent, f"{parent.info.run_id[:8]}")
            for child in _children(client, exp_id, parent.info.run_id):
                stage = child.data.tags.get("mlflow.runName", "?")
                col.metrics.update({f"{stage}.{k}": v for k, v in child.data.metrics.items()})
            cols.append(col)
        return cols
    parent = pipeline_runs(client, exp_id, 1)[0]
    children = _children(client, exp_id, parent.info.run_id)
    if not children:
        raise CompareError(f"pipeline run {parent.info.run_id} has no stage runs")
    return [_column(c) for c in children]


def names_metric(key: str, name: str) -> bool:
    """Whether --metric NAME picks the row `key`: its whole key, or a dotted tail of it
    (`final_loss` and `midtrain.final_loss` both pick --pipelines' `midtrain.final_loss`;
    `state_exact_match` and `midtrain.state_exact_match` pick `evaluate.midtrain.state_exact_match`).
    The one rule for both the check of unknown names and the rows picked."""
    return key == name or key.endswith("." + name)


def metric_rows(cols: list[Column], wanted: list[str] | None) -> list[str]:
    present = {k for c in cols for k in c.metrics}
    if wanted:
        missing = [m for m in wanted if not any(names_metric(k, m) for k in present)]
        if missing:
            raise CompareError(f"no run has metric(s) {', '.join(missing)} "
                               f"(known: {', '.join(sorted(present)[:30])})")
        return [k for k in sorted(present) if any(names_metric(k, m) for m in wanted)]
    first = [k for k in KEY_METRICS if k in present]
    return first + sorted(present - set(first))


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        # MLflow stores every metric as a float: counts (records, bytes) are printed exactly
        # rather than as 1.335e+04; other values with 4 significant digits, without an
        # exponent from 1000 on (12345.7, not 1.235e+04).
        if v.is_integer() and abs(v) < 1e16:
            return str(int(v))
        return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def markdown(cols: list[Column], rows: list[str]) -> str:
    head = "| metric | " + " | ".join(c.name for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    lines.append("| git commit | " + " | ".join((c.tags.get("git.commit") or "")[:8] for c in cols) + " |")
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(_fmt(c.metrics.get(r)) for c in cols) + " |")
    return "\n".join(lines)


def write_csv(cols: list[Column], rows: list[str], path: Path) -> None:
    import csv

    from codeworld.storage import write_file_atomic
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["metric", *[c.name for c in cols]])
    for r in rows:
        w.writerow([r, *[c.metrics.get(r, "") for c in cols]])
    write_file_atomic(path, buf.getvalue().encode())


def plot_format(path: Path) -> str:
    """The image format for --plot PATH: from its suffix, PNG without one (savefig is given it:
    the temporary file's name ends in .tmp). Raises CompareError for a folder or an unknown suffix."""
    from matplotlib.backend_bases import FigureCanvasBase

    if path.is_dir():
        raise CompareError(f"--plot {path}: is a folder (give a file name, e.g. {path / 'compare.png'})")
    fmt = path.suffix[1:].lower() or "png"
    if fmt not in FigureCanvasBase.get_supported_filetypes():
        raise CompareError(f"--plot {path}: no plot format {fmt!r} (use .png, .svg or .pdf)")
    return fmt


def plot(cols: list[Column], rows: list[str], path: Path) -> str:
    """Per-step loss of each run that logged one (training phases), else a bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmt = plot_format(path)
    client = _client()
    cols = labelled(cols)
    # keyed by run id: runs may share a name (the same phase of two pipeline runs)
    label = {c.run_id: c.name for c in cols}
    curves = {c.run_id: client.get_metric_history(c.run_id, "loss") for c in cols if "loss" in c.metrics}
    curves = {k: v for k, v in curves.items() if len(v) > 1}
    fig, ax = plt.subplots(figsize=(7, 4))
    if curves:
        for run_id, hist in curves.items():
            hist = sorted(hist, key=lambda m: m.step)
            ax.plot([m.step for m in hist], [m.value for m in hist], label=label[run_id])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        what = f"loss curves of {len(curves)} runs"
    else:
        if not rows:
            raise CompareError("nothing to plot: the runs have no metrics")
        metric = rows[0]
        # a run without the metric gets no bar, marked n/a (a bar at 0 would read as a value)
        vals = [c.metrics.get(metric, math.nan) for c in cols]
        missing = [i for i, v in enumerate(vals) if math.isnan(v)]
        ax.bar([i for i in range(len(cols)) if i not in missing],
               [v for i, v in enumerate(vals) if i not in missing])
        ax.set_xticks(range(len(cols)), [c.name for c in cols])   # every run keeps its place
        ax.set_xlim(-0.5, len(cols) - 0.5)
        for i in missing:
            ax.annotate("n/a", (i, 0), ha="center", va="bottom")
        ax.set_ylabel(metric)
        what = f"bar chart of {metric}"
        if missing:
            what += f" ({len(missing)} of {len(cols)} runs without it: n/a)"
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=100, format=fmt)
    plt.close(fig)
    tmp.replace(path)
    return what
