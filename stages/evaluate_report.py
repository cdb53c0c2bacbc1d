"""reports/evaluate.md: the evaluation as a markdown report, with one plot per phase (its
training curve, or RL's reward curve, beside its held-out metrics) and one plot of the phases
side by side. PNGs with matplotlib (an MLflow dependency); their metadata carries no version or
clock, so the same figures give the same bytes."""

from __future__ import annotations

import io
from pathlib import Path

from codeworld.storage import write_file_atomic
from codeworld.trace_metrics import METRICS, TEACHER_METRICS, parse

LABELS = {"valid_format": "valid trace format", "action_exact_match": "action exact match",
          "state_exact_match": "state exact match", "key_match": "key match",
          "key_value_match": "key-value match", "trace_exact_match": "whole trace exact",
          "output_exact_match": "output exact match (CruxEval-O prompt)",
          "output_from_trace": "output from the predicted trace",
          "next_frame_exact": "next frame exact", "next_action_exact": "next action exact",
          "next_state_exact": "next state exact",
          "trace_token_accuracy": "trace token accuracy", "trace_nll": "trace NLL per token"}
OUTPUT_METRICS = ("output_exact_match", "output_from_trace")
EXAMPLE_FRAMES = 6


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _table(rows: list[tuple[str, list]], phases: list[str], first: str = "metric") -> list[str]:
    out = [f"| {first} | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
    out += [f"| {name} | " + " | ".join(_fmt(v) for v in vals) + " |" for name, vals in rows]
    return out


def _present(r: dict, names) -> list[tuple[int, float]]:
    """(position, value) of each metric the phase has: one it lacks (no program with an
    output task drawn, a summary written before the metric existed) is left out of a plot,
    never drawn as a 0."""
    return [(i, float(r[m])) for i, m in enumerate(names)
            if isinstance(r.get(m), (int, float)) and not isinstance(r.get(m), bool)]


def _plots(report: Path, doc: dict) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:   # the report then has tables only
        return []
    folder = report.with_suffix("")
    keep = {f"{p}.png" for p in doc["phases"]} | {"phases.png"}
    for old in folder.glob("*.png") if folder.is_dir() else []:
        if old.name not in keep:   # a phase no longer evaluated
            old.unlink()
    files = []
    names = [*METRICS, *OUTPUT_METRICS, *TEACHER_METRICS, "trace_token_accuracy"]
    for phase, r in doc["phases"].items():
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        curve = r.get("rl_curve") or []
        if phase == "rl" and curve:
            for key in sorted({k for p in curve for k in p if k != "step"}):
                pts = [(p["step"], p[key]) for p in curve if key in p]
                left.plot([s for s, _ in pts], [v for _, v in pts], label=key)
            left.set_title("rl: reward per step")
            left.legend(fontsize=7)
        else:
            loss = r.get("loss_curve") or []
            left.plot([p["step"] for p in loss], [p["loss"] for p in loss])
            left.set_title(f"{phase}: training loss")
        left.set_xlabel("step")
        bars = _present(r, names)
        right.barh([i for i, _ in bars], [v for _, v in bars])
        right.set_yticks(range(len(names)), [LABELS[m] for m in names], fontsize=7)
        shown = dict(bars)
        for i in range(len(names)):
            right.text(shown[i] + 0.01 if i in shown else 0.01, i,
                       f"{shown[i]:.2f}" if i in shown else "n/a", va="center", fontsize=7)
        right.set_ylim(len(names) - 0.5, -0.5)   # every label, the missing ones' rows too
        right.set_xlim(0, 1.1)
        right.set_title(f"held-out ({r.get('programs', 0)} programs)")
        fig.tight_layout()
        files.append(_save(fig, folder / f"{phase}.png"))
        plt.close(fig)
    phases = list(doc["phases"])
    if phases:
        fig, ax = plt.subplots(figsize=(10, 3.6))
        width = 0.8 / len(phases)
        for i, phase in enumerate(phases):
            bars = _present(doc["phases"][phase], names)
            ax.bar([j + i * width for j, _ in bars], [v for _, v in bars], width, label=phase)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))],
                      [LABELS[m].split(" (")[0] for m in names], rotation=20, fontsize=7, ha="right")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("trace and output prediction on the same held-out programs")
        fig.tight_layout()
        files.append(_save(fig, folder / "phases.png"))
        plt.close(fig)
    return files


def _delta(a: dict, b: dict, m: str) -> str:
    """b − a for a metric both phases have; a missing one is no 0."""
    if not all(isinstance(r.get(m), (int, float)) for r in (a, b)):
        return "n/a"
    return f"{b[m] - a[m]:+.3f}"


def _without_perplexity(counts: dict) -> list[tuple[str, str]]:
    """Pack sources evaluate measured no perplexity on, and why (its counts)."""
    out = [(k[len("ppl_documents_"):], "no held-out document") for k, v in counts.items()
           if k.startswith("ppl_documents_") and v == 0]
    out += [(k[len("ppl_missing_"):], "dataset unreadable") for k in counts
            if k.startswith("ppl_missing_")]
    return sorted(out)


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    write_file_atomic(path, buf.getvalue())
    return path


def _frame_line(fr) -> str:
    if fr is None:
        return "(none)"
    state = fr.locals if fr.kind in ("call", "line") else fr.value
    return f"{fr.kind:9} {fr.source.rstrip()!s:40.40} {state}"


def _example(row: dict, prog: dict) -> list[str]:
    """The first frames of one prediction beside the real ones."""
    pred = parse(row["predicted"]).frames
    real = prog["real"].frames
    head = row["predicted"][:160].replace("`", "'")
    lines = [f"`{row['id']}` ({row['frames_predicted']} frames predicted, "
             f"{row['frames_real']} real); the prediction begins `{head!r}`"
             + (f", first defect: {row['errors'][0]}" if row["errors"] else "") + ":", "", "```"]
    for i in range(min(EXAMPLE_FRAMES, max(len(real), len(pred)))):
        p = pred[i] if i < len(pred) else None
        r = real[i] if i < len(real) else None
        same = p is not None and r is not None and p.action == r.action and p.state == r.state
        lines.append(f"{'=' if same else '!'} real {_frame_line(r)}")
        lines.append(f"  pred {_frame_line(p)}")
    return lines + ["```"]


def write_report(path: Path, doc: dict, programs: list[dict],
                 rows: dict[str, list[dict]] | None = None) -> list[Path]:
    """The markdown report and its plots; returns the files written."""
    files = _plots(path, doc)
    phases = list(doc["phases"])
    res = doc["phases"]
    c = doc["counts"]
    md = ["# Evaluation on held-out programs", "",
          f"Every phase answers the same {c.get('programs', 0)} held-out programs "
          f"({c.get('output_tasks', 0)} of which returned, for output prediction), drawn from "
          f"{c.get('heldout_traces', 0)} held-out traces (never in the tokenizer or any training "
          f"source); not drawn: {c.get('skipped_too_long', 0)} too long, "
          f"{c.get('skipped_answer_too_long', 0)} with a trace longer than the generation cap, "
          f"{c.get('skipped_no_task', 0)} without a trace task, {c.get('skipped_broken', 0)} "
          f"broken; {c.get('skipped_output_too_long', 0)} not asked their output (a repr longer "
          f"than its cap), {c.get('skipped_output_truncated', 0)} not asked it for a repr the "
          f"tracer cut short (no answer is the cut text). Greedy decoding.", "",
          f"Phases evaluated: {', '.join(phases)}" + (
              f"; not evaluated: {', '.join(doc['missing'])}" if doc["missing"] else "") + ".", ""]
    # why a phase was left out (summary.json's `unusable`; absent: it has no checkpoint)
    md += [f"- {name}: {doc.get('unusable', {}).get(name, 'no checkpoint')}"
           for name in doc["missing"]] + ([""] if doc["missing"] else [])
    md += ["## Trace prediction (CWM Table 9), side by side", ""]
    md += _table([(LABELS[m], [res[p].get(m) for p in phases]) for m in METRICS], phases)
    md += ["", "## Next-frame prediction given the real trace so far (teacher-forced)", "",
           "Not in CWM's Table 9: the neural debugger's step. One forward pass over prompt + "
           "real trace; a frame counts when greedy decoding from the real prefix would write "
           "it exactly (its action, its state, or all of it); token accuracy: the share of the "
           "trace's tokens that are the model's argmax given the real prefix.", ""]
    md += _table([(LABELS[m], [res[p].get(m) for p in phases])
                  for m in (*TEACHER_METRICS, "trace_token_accuracy", "trace_nll")], phases)
    if "pretrain" in res and "midtrain" in res:
        a, b = res["pretrain"], res["midtrain"]
        md += ["", "**Mid-training effect** (midtrain − pretrain, same held-out programs): " +
               ", ".join(f"{LABELS[m]} {_fmt(a.get(m))} → {_fmt(b.get(m))} ({_delta(a, b, m)})"
                         for m in ("valid_format", "action_exact_match", "state_exact_match",
                                   "next_frame_exact", "next_action_exact", "next_state_exact",
                                   "trace_token_accuracy", "trace_nll")) + "."]
    md += ["", "## Output prediction", ""]
    md += _table([(LABELS[m], [res[p].get(m) for p in phases]) for m in OUTPUT_METRICS], phases)
    sources = sorted({k[4:] for r in res.values() for k in r if k.startswith("ppl_")})
    without = _without_perplexity(c)
    if sources or without:
        md += ["", "## Perplexity on held-out documents (loss-masked tokens)", ""]
    if sources:
        md += _table([(s, [res[p].get(f"ppl_{s}") for p in phases]) for s in sources], phases,
                     "pack source")
    if without:
        md += ["", "No perplexity: " + ", ".join(f"{s} ({why})" for s, why in without) + "."]
    if any(f.name == "phases.png" for f in files):
        md += ["", f"![phases]({path.with_suffix('').name}/phases.png)"]
    by_id = {p["id"]: p for p in programs}
    for phase in phases:
        r = res[phase]
        md += ["", f"## {phase}", "",
               f"Checkpoint `{r.get('checkpoint')}` (iteration {r.get('iteration')})."]
        if any(f.name == f"{phase}.png" for f in files):
            md += ["", f"![{phase}]({path.with_suffix('').name}/{phase}.png)"]
        rl = {k: v for k, v in r.items() if k.startswith("rl_") and k != "rl_curve"}
        if rl:
            md += ["", "RL: " + ", ".join(f"{k[3:]} {_fmt(v)}" for k, v in sorted(rl.items()))
                   + f" ({len(r.get('rl_curve') or [])} steps logged)."]
        example = next((row for row in (rows or {}).get(phase, []) if row["id"] in by_id), None)
        if example is not None:
            md += ["", "Example: "] + _example(example, by_id[example["id"]])
    write_file_atomic(path, ("\n".join(md) + "\n").encode())
    return [path, *files]
