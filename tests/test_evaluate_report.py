"""reports/evaluate.md and its plots: what a phase lacks is said, never drawn or counted as 0."""

from __future__ import annotations

import matplotlib.axes
import pytest

from stages.evaluate_report import write_report

# every metric the plots show, each at 0.5 (a 0 drawn can only be a missing metric)
SHOWN = ("valid_format", "action_exact_match", "state_exact_match", "key_match",
         "key_value_match", "trace_exact_match", "next_frame_exact", "next_action_exact",
         "next_state_exact", "trace_token_accuracy")


@pytest.fixture
def drawn(monkeypatch):
    """The bar lengths every bar() and barh() draws, and every text put on the axes."""
    out = {"bars": [], "texts": []}
    original_bar = matplotlib.axes.Axes.bar

    def bar(self, x, height, *args, **kwargs):   # barh() draws through bar(), lengths in width
        lengths = kwargs["width"] if kwargs.get("orientation") == "horizontal" else height
        out["bars"] += [float(v) for v in lengths]
        return original_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    original_text = matplotlib.axes.Axes.text

    def text(self, x, y, s, *args, **kwargs):
        out["texts"].append(s)
        return original_text(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", text)
    return out


def _doc() -> dict:
    # no output task was drawn: neither phase has the output metrics
    phase = {"checkpoint": "c", "iteration": 1, "programs": 2, "loss_curve": [],
             **{m: 0.5 for m in SHOWN}, "ppl_code": 3.0}
    return {"phases": {"pretrain": dict(phase), "midtrain": dict(phase)}, "missing": [],
            "counts": {"programs": 2, "ppl_documents_code": 2, "ppl_documents_agent": 0,
                       "ppl_missing_sft_agent": 1}}


def test_missing_metrics_are_not_drawn_as_zero(tmp_path, drawn):
    files = write_report(tmp_path / "evaluate.md", _doc(), [])
    assert len(files) == 4   # the report, one plot per phase, the phases side by side
    # per phase plot and the side-by-side one: only the 10 metrics the phases have
    assert drawn["bars"] == [0.5] * (len(SHOWN) * 4)
    assert drawn["texts"].count("n/a") == 2 * 2   # both output metrics, in each phase's plot


def test_the_report_says_which_sources_have_no_perplexity_and_why(tmp_path, drawn):
    doc = _doc()
    doc["phases"]["midtrain"]["valid_format"] = 0.75
    del doc["phases"]["pretrain"]["state_exact_match"]
    write_report(tmp_path / "evaluate.md", doc, [])
    md = (tmp_path / "evaluate.md").read_text()
    assert "No perplexity: agent (no held-out document), sft_agent (dataset unreadable)." in md
    # the mid-training delta of a metric one phase lacks is n/a, not a difference from 0
    assert "valid trace format 0.500 → 0.750 (+0.250)" in md
    assert "state exact match – → 0.500 (n/a)" in md


def test_the_report_says_why_each_phase_was_left_out(tmp_path, drawn):
    # a phase left out for a damaged checkpoint or another tokenizer was called "no checkpoint"
    doc = _doc()
    doc["missing"] = ["sft", "rl"]
    doc["unusable"] = {"sft": "data/checkpoints/sft/iter_0000004/__0_1.distcp: missing"}
    doc["counts"].update(skipped_answer_too_long=4, skipped_output_too_long=1,
                         skipped_output_truncated=2)
    write_report(tmp_path / "evaluate.md", doc, [])
    md = (tmp_path / "evaluate.md").read_text()
    assert "not evaluated: sft, rl." in md and "no checkpoint: sft" not in md
    assert "- sft: data/checkpoints/sft/iter_0000004/__0_1.distcp: missing\n- rl: no checkpoint" in md
    assert "4 with a trace longer than the generation cap" in md
    assert "1 not asked their output (a repr longer than its cap), 2 not asked it for a repr " \
        "the tracer cut short" in md
