"""Evaluation: the CWM trace parser and Table 9 metrics on real tracer output, KV-cached
decoding against full recomputation, and the `evaluate` stage on a tiny trained checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from codeworld.config import ConfigError, parse_params
from codeworld.storage import Storage
from codeworld.tokens import END_OF_TEXT, SPECIAL_TOKENS, TRACE_TOKENS
from codeworld.trace_metrics import frame_metrics, mean_metrics, parse, teacher_forced
from stages.tracer import trace_call

CTX, FRAME, CALL, LINE, RET, EXC, ACT, ARG = TRACE_TOKENS

NESTED = """\
def helper(v):
    w = v * 2
    return w

def f(xs, k):
    total = 0
    for x in xs:
        total += helper(x)
    squares = [y * y for y in xs]
    return total + k + len(squares)
"""
RAISES = """\
import struct

def inner(s):
    try:
        return s.read(4)
    except struct.error:
        return None

def f(s):
    n = 1
    return inner(s) + n
"""
GENERATOR = """\
def gen(n):
    for i in range(n):
        yield i * 3

def f(n):
    out = []
    for v in gen(n):
        out.append(v)
    return out
"""


def real(code: str, call: str):
    r = trace_call(code, call)
    assert r.status in ("ok", "exception"), r.error
    return r


@pytest.mark.parametrize("code, call", [(NESTED, "f([1, 2], 5)"), (RAISES, "f('abc')"),
                                        (GENERATOR, "f(3)")])
def test_parser_resolves_real_traces_to_the_tracers_own_frames(code, call):
    # '..' resolved by the inferred scope stack gives back the full locals the tracer recorded,
    # through nested calls, a comprehension, an uncaught exception crossing an `except` line
    # and a generator's yields and resumes
    r = real(code, call)
    parsed = parse(r.text + END_OF_TEXT)
    assert parsed.valid, parsed.errors
    frames = r.frames[1:]   # main's call frame is in no text: traces start at its first line
    assert len(parsed.frames) == len(frames)
    for p, f in zip(parsed.frames, frames):
        assert (p.kind, p.source) == (f.kind, f.source)
        assert p.state == (f.locals if f.kind in ("call", "line") else f.value)
    assert parsed.returned == r.result


# A Python scope whose exception C code swallows ends with no frame that says so: its exception
# frame (or, for a generator closed through a `finally`, the finally's lines) and then the
# caller's next frame. The guards after the four are what the parser told apart before.
ITERATOR = """\
class It:
    def __init__(self, n):
        self.n = n
    def __iter__(self):
        return self
    def __next__(self):
        if self.n == 0:
            raise StopIteration
        self.n -= 1
        return self.n

def f(n):
    out = list(It(n))
    return out
"""
HASATTR = """\
class A:
    @property
    def x(self):
        raise AttributeError("x")

def f():
    a = A()
    return hasattr(a, "x")
"""
GETATTR = """\
class A:
    def __getattr__(self, name):
        raise AttributeError(name)

def f():
    a = A()
    v = getattr(a, "x", 5)
    return v
"""
CLOSED = """\
def gen():
    try:
        yield 1
    finally:
        x = 0

def f():
    g = gen()
    next(g)
    g.close()
    return 1
"""
CAUGHT_IN_SCOPE = """\
def h(x):
    try:
        y = 1 / x
    except ZeroDivisionError:
        y = 0
    return y

def f(x):
    y = h(x)
    return y
"""
PROPAGATES = """\
def a(x):
    return 1 / x

def b(x):
    try:
        return a(x) + 1
    finally:
        x = 2

def f(x):
    try:
        return b(x)
    except ZeroDivisionError:
        return -1
"""
EXIT_AFTER_RAISE = """\
class CM:
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return True

def f(x):
    with CM():
        x = 1 / x
    return x
"""
RECURSES = """\
def f(n):
    try:
        if n == 0:
            raise KeyError(n)
        return f(n - 1) + 1
    except KeyError:
        return 0
"""


def _scope_depths(frames) -> list[int]:
    """Each frame's depth from the tracer's own scope ids: a frame of an open scope closes the
    scopes above it, a frame of another one opens it, a return closes it."""
    stack, out = [0], []
    for f in frames:
        if f.scope in stack:
            del stack[stack.index(f.scope) + 1:]
        else:
            stack.append(f.scope)
        out.append(len(stack) - 1)
        if f.kind == "return":
            stack.pop()
    return out


@pytest.mark.parametrize("code, call", [
    (ITERATOR, "f(2)"), (HASATTR, "f()"), (GETATTR, "f()"), (CLOSED, "f()"),
    (CAUGHT_IN_SCOPE, "f(0)"), (PROPAGATES, "f(0)"), (EXIT_AFTER_RAISE, "f(0)"),
    (RECURSES, "f(2)"), (GENERATOR, "f(2)"), (NESTED, "f([1, 2], 5)")],
    ids=["list-iterator", "hasattr-property", "getattr-default", "generator-close-finally",
         "caught-in-scope", "propagates-through-finally", "with-exit", "recursion",
         "generator", "nested"])
def test_a_scope_whose_exception_c_code_swallowed_is_left_and_the_caller_goes_on(code, call):
    # list() ends on It.__next__'s StopIteration, hasattr()/getattr(..., default) on an
    # AttributeError, g.close() on the GeneratorExit its `finally` re-raises: the scope keeps
    # no frame after that, and the parser must not keep it open (else main's return never
    # empties the stack: no valid trace, no output, every depth after it off by one)
    r = real(code, call)
    parsed = parse(r.text + END_OF_TEXT)
    assert parsed.valid and parsed.finished, parsed.errors
    frames = r.frames[1:]
    assert [(p.kind, p.source, p.state) for p in parsed.frames] == \
        [(f.kind, f.source, f.locals if f.kind in ("call", "line") else f.value) for f in frames]
    assert [p.depth for p in parsed.frames] == _scope_depths(frames)
    assert parsed.returned == r.result
    m = frame_metrics(parsed, parse(r.text + END_OF_TEXT), r.result)
    assert m["valid_format"] == m["trace_exact_match"] == m["output_from_trace"] == 1.0


def test_perfect_prediction_scores_one_everywhere():
    r = real(NESTED, "f([1, 2], 5)")
    text = r.text + END_OF_TEXT
    m = frame_metrics(parse(text), parse(text), r.result)
    assert m == {"valid_format": 1.0, "action_exact_match": 1.0, "state_exact_match": 1.0,
                 "key_match": 1.0, "key_value_match": 1.0, "trace_exact_match": 1.0,
                 "output_from_trace": 1.0}


def _synthetic(c: int, extra: str = "") -> str:
    return (f"{LINE}{{}}{ACT}    return f(1, 2)\n{FRAME}"
            f"{CALL}{{\"a\": \"1\", \"b\": \"2\"}}{ACT}def f(a, b):\n{FRAME}"
            f"{LINE}{{\"a\": \"..\", \"b\": \"..\"}}{ACT}    c = a * 2 + b\n{FRAME}"
            f"{LINE}{{\"a\": \"..\", \"b\": \"..\", \"c\": \"{c}\"{extra}}}{ACT}    return c\n{FRAME}"
            f"{RET}{ACT}    return c\n{ARG}\"{c}\"{FRAME}"
            f"{RET}{ACT}    return f(1, 2)\n{ARG}\"{c}\"{FRAME}{END_OF_TEXT}")


def test_a_changed_local_lowers_state_and_key_value_match_not_key_match():
    truth = parse(_synthetic(4))
    m = frame_metrics(parse(_synthetic(5)), truth, "4")
    assert m["valid_format"] == 1.0 and m["action_exact_match"] == 1.0
    assert m["state_exact_match"] == pytest.approx(3 / 6)   # c's frame and both returns differ
    assert m["key_match"] == 1.0
    assert m["key_value_match"] == pytest.approx((1 + 1 + 1 + 2 / 3) / 4)
    assert m["trace_exact_match"] == 0.0 and m["output_from_trace"] == 0.0


def test_an_extra_local_lowers_key_match():
    m = frame_metrics(parse(_synthetic(4, ', "d": "0"')), parse(_synthetic(4)), "4")
    assert m["key_match"] == pytest.approx(3 / 4)
    assert m["state_exact_match"] == pytest.approx(5 / 6)


def test_same_resolves_against_the_previous_frame_of_the_scope():
    # writing ".." for c where it changed means "c is still what it was": a wrong state
    truth = (f"{LINE}{{}}{ACT}    return f()\n{FRAME}{CALL}{{}}{ACT}def f():\n{FRAME}"
             f"{LINE}{{}}{ACT}    c = 1\n{FRAME}{LINE}{{\"c\": \"1\"}}{ACT}    c = 2\n{FRAME}"
             f"{LINE}{{\"c\": \"2\"}}{ACT}    return c\n{FRAME}"
             f"{RET}{ACT}    return c\n{ARG}\"2\"{FRAME}{RET}{ACT}    return f()\n{ARG}\"2\"{FRAME}{END_OF_TEXT}")
    pred = truth.replace('{"c": "2"}', '{"c": ".."}')
    p = parse(pred)
    assert p.valid and p.frames[4].locals == {"c": "1"}
    assert frame_metrics(p, parse(truth))["state_exact_match"] == pytest.approx(6 / 7)


def test_garbage_is_an_invalid_trace_with_no_credit():
    truth = parse(_synthetic(4))
    for text in ("def def def", f"{LINE}not json{ACT}x\n{FRAME}", "", f"{RET}{FRAME}"):
        p = parse(text)
        assert not p.valid and (p.errors or not p.ended)
        m = frame_metrics(p, truth, "4")
        assert m["valid_format"] == 0.0 and m["state_exact_match"] == 0.0
        assert m["action_exact_match"] == 0.0 and m["output_from_trace"] == 0.0


def test_a_cut_prediction_keeps_credit_for_its_frames_but_is_invalid():
    text = _synthetic(4)
    cut = text[:text.index(f"{RET}")]   # no return frames, no end-of-text
    m = frame_metrics(parse(cut), parse(text), "4")
    assert m["valid_format"] == 0.0
    assert m["action_exact_match"] == pytest.approx(4 / 6)
    assert m["state_exact_match"] == pytest.approx(4 / 6)


def test_a_prediction_that_never_ends_is_not_exact_and_has_no_output():
    # the parser stops at main's exit and keeps a cut prediction's frames: right frames alone
    # must not pass for a trace that ends where the real one does
    text = _synthetic(4)
    body = text.replace(END_OF_TEXT, "")
    runs_on = body + f"{LINE}{{}}{ACT}    x\n{FRAME}"
    for pred in (body, runs_on, runs_on + END_OF_TEXT, body + "tail" + END_OF_TEXT):
        p = parse(pred)
        m = frame_metrics(p, parse(text), "4")
        assert m["action_exact_match"] == 1.0 and m["state_exact_match"] == 1.0
        assert m["valid_format"] == 0.0
        assert m["trace_exact_match"] == 0.0 and m["output_from_trace"] == 0.0
        assert not p.finished


def test_a_finished_trace_with_a_bad_same_keeps_its_output_but_is_not_exact():
    # a '..' with nothing to resolve to is a semantic slip (invalid), not an unended trace:
    # main's return value is written in full, so the output still counts
    truth = (f"{LINE}{{}}{ACT}    return f()\n{FRAME}{CALL}{{}}{ACT}def f():\n{FRAME}"
             f"{LINE}{{}}{ACT}    c = 1\n{FRAME}{LINE}{{\"c\": \"1\"}}{ACT}    return c\n{FRAME}"
             f"{RET}{ACT}    return c\n{ARG}\"1\"{FRAME}{RET}{ACT}    return f()\n{ARG}\"1\"{FRAME}"
             f"{END_OF_TEXT}")
    p = parse(truth.replace('{"c": "1"}', '{"c": ".."}'))
    m = frame_metrics(p, parse(truth), "1")
    assert m["valid_format"] == 0.0 and m["trace_exact_match"] == 0.0
    assert m["output_from_trace"] == 1.0
    assert p.finished and not p.valid and "not a local" in p.errors[0]


def test_bad_frames_are_reported():
    assert "'..' in a call frame" in parse(f"{CALL}{{\"a\": \"..\"}}{ACT}def f(a):\n{FRAME}").errors[0]
    assert "not a local" in parse(f"{LINE}{{\"z\": \"..\"}}{ACT}    x\n{FRAME}").errors[0]
    assert "after main was left" in parse(_synthetic(4).replace(END_OF_TEXT, "") +
                                          f"{LINE}{{}}{ACT}    x\n{FRAME}").errors[0]


def _char_tokens(text: str) -> list[tuple[int, int]]:
    """Offsets of a tokenisation with every special token whole and every other char alone."""
    specials = (*TRACE_TOKENS, END_OF_TEXT)
    out, i = [], 0
    while i < len(text):
        tok = next((t for t in specials if text.startswith(t, i)), text[i])
        out.append((i, i + len(tok)))
        i += len(tok)
    return out


def test_teacher_forced_next_frame_metrics_split_action_and_state():
    text = _synthetic(4)
    offsets = _char_tokens(text)
    assert teacher_forced(text, offsets, [True] * len(offsets)) == {
        "next_frame_exact": 1.0, "next_action_exact": 1.0, "next_state_exact": 1.0}
    # one wrong token in frame 3's LOCALS (the "4" of c), one in frame 5's source line
    c_at = text.index('"c": "4"') + 6
    src_at = text.index(f"{RET}{ACT}    return f") + len(RET) + len(ACT) + 4
    correct = [not (a <= c_at < b or a <= src_at < b) for a, b in offsets]
    m = teacher_forced(text, offsets, correct)
    assert m["next_frame_exact"] == pytest.approx(4 / 6)
    assert m["next_state_exact"] == pytest.approx(5 / 6)
    assert m["next_action_exact"] == pytest.approx(5 / 6)
    # a wrong end-of-text is no frame's
    assert teacher_forced(text, offsets, [True] * (len(offsets) - 1) + [False])["next_frame_exact"] == 1.0


def test_mean_metrics_averages_each_metric_over_the_programs_that_have_it():
    assert mean_metrics([{"a": 1.0, "o": 1.0}, {"a": 0.0}]) == {"a": 0.5, "o": 1.0}


class CharTokenizer:
    """A stand-in tokenizer: every special token whole (end-of-text is id 0, as in the real
    one), every other character one token; enough to see how documents become a stream."""

    def __init__(self):
        self.special = {t: i for i, t in enumerate(SPECIAL_TOKENS)}

    def encode(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(ids=[self.special.get(text[a:b], 1000 + ord(text[a]))
                                    for a, b in _char_tokens(text)])

    def encode_batch(self, texts: list[str]) -> list[SimpleNamespace]:
        return [self.encode(t) for t in texts]


def _program_records(n: int) -> list[dict]:
    """Trace records (no end-of-text of their own), every other one with a long context."""
    out = []
    for i in range(n):
        pad = "# padding\n" * 20 if i % 2 else ""
        prompt = f"{CTX}{pad}def f():\n    return {i}\n\ndef main():\n    return f()\n{FRAME}"
        trace = (f"{LINE}{{}}{ACT}    return f()\n{FRAME}{CALL}{{}}{ACT}def f():\n{FRAME}"
                 f"{LINE}{{}}{ACT}    return {i}\n{FRAME}"
                 f"{RET}{ACT}    return {i}\n{ARG}\"{i}\"{FRAME}"
                 f"{RET}{ACT}    return f()\n{ARG}\"{i}\"{FRAME}")
        out.append({"id": f"p{i}", "prompt": prompt, "trace": trace, "status": "ok",
                    "provenance": {"corpus_id": f"prog/{i}.py"}})
    return out


def test_perplexity_streams_are_the_documents_pack_would_write(tmp_path):
    from codeworld.split import corpus_id, heldout
    from stages.documents import render
    from stages.evaluate import heldout_streams
    from stages.pack import document_tokens, too_long
    from tests.train_fixtures import write_dataset

    records = _program_records(24)
    write_dataset(tmp_path, "traces", records)
    # a source none of whose records is held out: no perplexity, and the summary says so
    write_dataset(tmp_path, "dedup", [{"id": f"c{i}", "text": "x = 1\n"} for i in range(40)
                                      if not heldout(f"c{i}", 50.0)])
    short = 200
    params = parse_params({"storage": {"root": str(tmp_path)}, "pack": {
        "heldout_percent": 50.0, "sources": {
            "code": {"dataset": "dedup", "format": "code"},
            "traces": {"dataset": "traces", "format": "trace"},
            "traces_short": {"dataset": "traces", "format": "trace", "max_document_tokens": short},
            "sft_trace": {"dataset": "traces", "format": "sft_trace"},
            "traces_capped": {"dataset": "traces", "format": "trace", "max_tokens": 50}}},
        "evaluate": {"ppl_max_tokens": 100_000}}, "p.yaml")
    tok = CharTokenizer()
    counts: dict = {}
    streams = heldout_streams(params, Storage(str(tmp_path)), tok, counts)
    held = [r for r in records if heldout(corpus_id(r), 50.0)]
    assert held and len(held) < len(records)
    for name in ("traces", "traces_short", "sft_trace"):
        src = params.pack.sources[name]
        ids, mask = [], []
        for r in held:
            segments = render(r, src.format)
            doc = document_tokens(segments, [tok.encode(t).ids for t, _ in segments], src)
            if not too_long(doc[0], src):
                ids += doc[0]
                mask += doc[1]
        assert streams[name] == (ids, mask), name
    # the SFT answer ends with its own end-of-text: not a second one in the loss
    ids, mask = streams["sft_trace"]
    assert not any(ids[i] == ids[i - 1] == 0 for i in range(1, len(ids)))
    # max_document_tokens leaves the long programs out, as pack does
    assert streams["traces_short"] != streams["traces"]
    assert counts["ppl_too_long_traces_short"] == sum(i % 2 for i in range(24)
                                                      if records[i] in held)
    assert "code" not in streams and counts["ppl_documents_code"] == 0
    # no more held-out tokens than the source packs (the window's last target included)
    assert streams["traces_capped"][0] == streams["traces"][0][:51]


def test_evaluate_params_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="evaluate.phases"):
        parse_params({"evaluate": {"phases": ["pretrain", "posttrain"]}}, "p.yaml")
    with pytest.raises(ConfigError, match="max_programs"):
        parse_params({"evaluate": {"max_programs": 0}}, "p.yaml")


def test_evaluate_without_any_checkpoint_says_where_it_looked(tmp_path):
    from stages.evaluate import run

    params = parse_params({"storage": {"root": str(tmp_path)}}, "p.yaml")
    with pytest.raises(ConfigError, match="no checkpoint to evaluate"):
        run(params, track=False, metrics_path=None, report_path=None)


# --- the stage's handling of each phase, its model stood in (no training needed) -------------

def _stage_root(root: Path, records: list[dict] | None = None, **evaluate) -> tuple[object, str]:
    """A storage root with a real (tiny) tokenizer and its manifest, held-out trace records,
    and the params; returns (params, the tokenizer's sha256)."""
    import hashlib

    from tokenizers import Tokenizer, models, pre_tokenizers
    from tests.train_fixtures import write_dataset

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "return": 1, "def": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()   # a token per word and per punctuation run
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    body = tok.to_str().encode()
    sha = hashlib.sha256(body).hexdigest()
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "tokenizer.json").write_bytes(body)
    (root / "tokenizer" / "manifest.json").write_text(json.dumps({"sha256": sha}))
    write_dataset(root, "traces", records if records is not None else _program_records(24))
    params = parse_params({"storage": {"root": str(root)}, "pack": {
        "heldout_percent": 50.0, "sources": {   # the phases' default blends name these
            "code": {"dataset": "dedup", "format": "code"},   # none: no perplexity, counted
            "traces": {"dataset": "traces", "format": "trace"},
            "sft_trace": {"dataset": "traces", "format": "sft_trace"}}},
        "evaluate": {"max_programs": 4, **evaluate}}, "p.yaml")
    return params, sha


def _phase(root: Path, name: str, tokenizer_sha256: str | None, iteration: int = 4,
           fingerprint: str | None = None) -> Path:
    """A phase directory as training leaves it: iter_N (a shard and the file list it was saved
    with), latest.json naming it, run.json."""
    from model import checkpoint

    ckdir = root / "checkpoints" / name
    it = ckdir / f"iter_{iteration:07d}"
    it.mkdir(parents=True)
    (it / "__0_0.distcp").write_bytes(b"w" * 10)
    (it / "codeworld_files.json").write_text(json.dumps({"__0_0.distcp": 10}))
    checkpoint.point_latest(ckdir, it)
    (ckdir / "run.json").write_text(json.dumps({
        "phase": name, "fingerprint": fingerprint or f"fp-{name}",
        "tokenizer_sha256": tokenizer_sha256}))
    return ckdir


def _stand_in(monkeypatch, unreadable: tuple[str, ...] = ()) -> list[str]:
    """evaluate_phase replaced by one that loads nothing; returns the phases it was given. The
    phases in `unreadable` fail as torch's loader fails on a lost shard (CheckpointException,
    a BaseException)."""
    import stages.evaluate as ev
    from model.checkpoint import iteration_of
    from torch.distributed.checkpoint import CheckpointException

    done = []

    def evaluate_phase(params, phase, iteration_dir, vocab_size, tok, programs, streams):
        if not iteration_dir.is_dir():
            raise FileNotFoundError(f"{iteration_dir}: checkpoint directory not found")
        done.append(phase)
        if phase in unreadable:
            lost = FileNotFoundError(2, "No such file or directory", str(iteration_dir / "__0_1.distcp"))
            raise CheckpointException("read_data", {0: (lost, None)})
        return ({"checkpoint": str(iteration_dir), "iteration": iteration_of(iteration_dir),
                 "programs": len(programs), "valid_format": 0.5, "generated_tokens": 0,
                 "tokens_per_s": 0.0, "seconds": 0.0},
                [{"id": p["id"], "metrics": {}} for p in programs])

    monkeypatch.setattr(ev, "evaluate_phase", evaluate_phase)
    return done


def _summary(root: Path) -> dict:
    return json.loads((root / "evaluate" / "summary.json").read_text())


def test_a_phase_trained_with_another_tokenizer_is_left_out_and_named(tmp_path, monkeypatch):
    """run.json records the tokenizer a phase trained with: evaluated with another (same
    vocabulary size, other ids) its figures would be noise. Left out like a phase without a
    checkpoint, with the reason in the summary; the other phases are evaluated."""
    from stages.evaluate import run

    params, sha = _stage_root(tmp_path)
    _phase(tmp_path, "pretrain", sha)
    _phase(tmp_path, "midtrain", "ab" * 32)
    _phase(tmp_path, "sft", None)   # a run that recorded no tokenizer: nothing to compare
    done = _stand_in(monkeypatch)
    run(params, track=False, metrics_path=None, report_path=None)
    assert done == ["pretrain", "sft"]
    summary = _summary(tmp_path)
    assert summary["missing"] == ["midtrain", "rl"] and list(summary["phases"]) == ["pretrain", "sft"]
    assert summary["unusable"]["midtrain"].startswith(
        f"{tmp_path / 'checkpoints' / 'midtrain' / 'run.json'}: midtrain was trained with tokenizer "
        f"sha256 abababababab..., {tmp_path / 'tokenizer'} holds {sha[:12]}...")
    assert not (tmp_path / "evaluate" / "midtrain.jsonl").exists()
    # nothing left to evaluate: the stage fails, saying why
    for name in ("pretrain", "sft"):
        shutil.rmtree(tmp_path / "checkpoints" / name)
    with pytest.raises(ConfigError, match="no checkpoint to evaluate: .*midtrain was trained "
                                          "with tokenizer sha256 abababababab"):
        run(params, track=False, metrics_path=None, report_path=None)


def test_the_summary_names_each_checkpoint_by_its_run_and_iteration(tmp_path, monkeypatch):
    """A phase retrained to the same iteration (the default always ends at iter_0000200) has
    the same checkpoint path and other weights: the summary and the stage's fingerprint name
    the run (run.json's fingerprint) and the iteration too, so the export can tell."""
    from stages.evaluate import run

    params, sha = _stage_root(tmp_path)
    ckdir = _phase(tmp_path, "pretrain", sha, fingerprint="run-one")
    _stand_in(monkeypatch)
    first = run(params, track=False, metrics_path=None, report_path=None)
    entry = _summary(tmp_path)["phases"]["pretrain"]
    assert entry["checkpoint"] == str(ckdir / "iter_0000004")
    assert (entry["iteration"], entry["run_fingerprint"]) == (4, "run-one")
    (ckdir / "run.json").write_text(json.dumps({"phase": "pretrain", "fingerprint": "run-two",
                                                "tokenizer_sha256": sha}))
    second = run(params, track=False, metrics_path=None, report_path=None)
    assert second["fingerprint"] != first["fingerprint"]
    assert _summary(tmp_path)["phases"]["pretrain"]["run_fingerprint"] == "run-two"
    assert _summary(tmp_path)["fingerprint"] == second["fingerprint"]
    # a run.json that does not say which run made the checkpoint: left out, the file named
    (tmp_path / "checkpoints" / "midtrain").mkdir()
    shutil.copytree(ckdir / "iter_0000004", tmp_path / "checkpoints" / "midtrain" / "iter_0000004")
    (tmp_path / "checkpoints" / "midtrain" / "run.json").write_text("{\"phase\": ")
    run(params, track=False, metrics_path=None, report_path=None)
    summary = _summary(tmp_path)
    assert list(summary["phases"]) == ["pretrain"] and "midtrain" in summary["missing"]
    assert summary["unusable"]["midtrain"].startswith(
        f"{tmp_path / 'checkpoints' / 'midtrain' / 'run.json'}: unreadable (JSONDecodeError")


def test_a_broken_phase_is_left_out_named_and_the_others_evaluated(tmp_path, monkeypatch):
    """A latest.json naming a folder that is gone, a garbled one, a checkpoint missing a file
    it was saved with: that phase is left out like one without a checkpoint, the file named
    in summary.json's `unusable`; the other phases are evaluated (it used to end the stage
    with a traceback)."""
    from stages.evaluate import run

    params, sha = _stage_root(tmp_path)
    ck = {n: _phase(tmp_path, n, sha) for n in ("pretrain", "midtrain", "sft", "rl")}
    (ck["midtrain"] / "latest.json").write_text('{"iteration": 6, "dir": "iter_0000006"}')
    (ck["sft"] / "iter_0000004" / "__0_0.distcp").unlink()
    (ck["rl"] / "latest.json").write_text('{"iteration": ')
    done = _stand_in(monkeypatch)
    run(params, track=False, metrics_path=None, report_path=None)
    assert done == ["pretrain"]
    summary = _summary(tmp_path)
    assert list(summary["phases"]) == ["pretrain"] and summary["missing"] == ["midtrain", "sft", "rl"]
    why = summary["unusable"]
    assert why["midtrain"] == f"{ck['midtrain'] / 'latest.json'} names iter_0000006, which does not exist"
    assert why["sft"].startswith(f"{ck['sft'] / 'iter_0000004' / '__0_0.distcp'}: missing: sft's "
                                 f"checkpoint iter_0000004 is damaged")
    assert why["rl"].startswith(f"{ck['rl'] / 'latest.json'}: not valid JSON")

    # a checkpoint whose loss no file list records: torch's loader fails, naming the file
    (ck["rl"] / "latest.json").write_text('{"iteration": 4, "dir": "iter_0000004"}')
    _stand_in(monkeypatch, unreadable=("rl",))
    run(params, track=False, metrics_path=None, report_path=None)
    summary = _summary(tmp_path)
    assert list(summary["phases"]) == ["pretrain"] and "rl" in summary["missing"]
    assert summary["unusable"]["rl"] == (
        f"{ck['rl'] / 'iter_0000004'}: unreadable checkpoint: FileNotFoundError: [Errno 2] No "
        f"such file or directory: '{ck['rl'] / 'iter_0000004' / '__0_1.distcp'}'")
    assert sorted(p.name for p in (tmp_path / "evaluate").iterdir()) == ["pretrain.jsonl",
                                                                        "summary.json"]

    # predictions of a phase evaluate.phases no longer lists go with the summary they were of
    for name in ("midtrain", "sft", "rl"):
        shutil.rmtree(ck[name])
        _phase(tmp_path, name, sha)
    _stand_in(monkeypatch)
    run(params, track=False, metrics_path=None, report_path=None)
    assert len(list((tmp_path / "evaluate").glob("*.jsonl"))) == 4
    fewer = params.model_copy(update={"evaluate": params.evaluate.model_copy(
        update={"phases": ["pretrain", "sft"]})})
    run(fewer, track=False, metrics_path=None, report_path=None)
    assert sorted(p.name for p in (tmp_path / "evaluate").iterdir()) == [
        "pretrain.jsonl", "sft.jsonl", "summary.json"]
    assert list(_summary(tmp_path)["phases"]) == ["pretrain", "sft"]


def test_no_program_drawn_names_both_caps(tmp_path, monkeypatch, caplog):
    """Traces are not drawn for max_program_tokens or for max_new_tokens: the warning that
    none was names both (it named max_program_tokens alone)."""
    from stages.evaluate import run

    params, sha = _stage_root(tmp_path, max_new_tokens=8)
    _phase(tmp_path, "pretrain", sha)
    _stand_in(monkeypatch)
    run(params, track=False, metrics_path=None, report_path=None)
    counts = _summary(tmp_path)["counts"]
    assert counts["programs"] == 0 and counts["skipped_answer_too_long"] == counts["heldout_traces"]
    assert "no held-out program fits max_program_tokens=320 (prompt + trace) and " \
           "max_new_tokens=8 (trace)" in caplog.text


def _sized_records(n: int) -> list[dict]:
    """Programs whose trace has i extra line frames and whose result is i words long."""
    out = []
    for i in range(n):
        result = repr(" ".join(["w"] * i))
        code = f"def f():\n" + "    pass\n" * i + f"    return {result}\n"
        trace = (f"{LINE}{{}}{ACT}    return f()\n{FRAME}{CALL}{{}}{ACT}def f():\n{FRAME}"
                 + f"{LINE}{{}}{ACT}    pass\n{FRAME}" * i
                 + f"{LINE}{{}}{ACT}    return {result}\n{FRAME}"
                 f"{RET}{ACT}    return {result}\n{ARG}{json.dumps(result)}{FRAME}"
                 f"{RET}{ACT}    return f()\n{ARG}{json.dumps(result)}{FRAME}")
        out.append({"id": f"s{i:02d}", "prompt": f"{CTX}{code}\ndef main():\n    return f()\n{FRAME}",
                    "trace": trace, "status": "ok", "result": result, "code": code, "call": "f()",
                    "provenance": {"corpus_id": f"sized/{i}.py"}})
    return out


def test_questions_the_generation_caps_cannot_let_the_model_answer_are_not_asked(tmp_path,
                                                                                 monkeypatch):
    """A trace longer than max_new_tokens, or an output answer (repr + end of turn) longer than
    output_max_new_tokens, cannot be answered whole: scored, it is a 0 whatever the model. Not
    drawn (the trace), not asked (the output task; the program's trace still is), counted;
    the same rule as RL's task builder."""
    from codeworld import prompts
    from codeworld.split import corpus_id, heldout
    from codeworld.tokens import encode
    from stages.evaluate import heldout_programs
    from stages.tokenizer import load

    records = _sized_records(40)
    params, _ = _stage_root(tmp_path, records, max_programs=100, max_program_tokens=10_000,
                            max_new_tokens=110, output_max_new_tokens=4)
    tok = load(Storage(str(tmp_path)))
    held = [r for r in records if heldout(corpus_id(r), 50.0)]
    trace_len = {r["id"]: len(tok.encode(prompts.trace_answer(r)).ids) for r in held}
    output_len = {r["id"]: len(encode(tok, prompts.output_answer(r["result"]))) for r in held}
    long_traces = {i for i, n in trace_len.items() if n > 110}
    long_outputs = {i for i, n in output_len.items() if n > 4 and i not in long_traces}
    assert long_traces and long_outputs and set(trace_len) - long_traces - long_outputs
    counts = {"heldout_traces": 0, "skipped_no_task": 0, "skipped_broken": 0,
              "skipped_too_long": 0}
    programs = heldout_programs(params, Storage(str(tmp_path)), tok, counts)
    assert {p["id"] for p in programs} == set(trace_len) - long_traces
    assert counts["skipped_answer_too_long"] == len(long_traces)
    assert {p["id"] for p in programs if not p["output_task"]} == long_outputs
    assert counts["skipped_output_too_long"] == len(long_outputs)
    assert counts["output_tasks"] == len(programs) - len(long_outputs)
    assert all(p["result"] is not None for p in programs)   # output_from_trace is still scored

    # evaluate_phase asks the output question of those programs only (a model stood in)
    import torch

    import model.generate
    from stages.evaluate import evaluate_phase

    asked = []

    class LM:
        checkpoint, iteration = tmp_path, 4

        def sample(self, ids, max_new_tokens, stop_ids):
            asked.append(max_new_tokens)
            return [[0]]

        def logits(self, toks):
            return torch.zeros(*toks.shape, tok.get_vocab_size())

    (tmp_path / "iter_0000004").mkdir()
    monkeypatch.setattr(model.generate, "load", lambda *a, **k: LM())
    summary, rows = evaluate_phase(params, "pretrain", tmp_path / "iter_0000004",
                                   tok.get_vocab_size(), tok, programs, {})
    assert asked.count(4) == counts["output_tasks"] and len(asked) == len(programs) + asked.count(4)
    assert {r["id"] for r in rows if "output_predicted" in r} == \
        {p["id"] for p in programs if p["output_task"]}


def test_an_output_the_tracer_cut_short_is_not_asked_and_is_counted(tmp_path):
    """A result repr over the tracer's limit is kept cut, with its mark: no answer is that
    text, so the question scored 0 whatever the model (RL's task builder skipped it already).
    Not asked, counted; the program's trace is still asked, its return frame scored against
    the cut value the trace itself holds."""
    from codeworld.split import corpus_id, heldout
    from stages.evaluate import heldout_programs
    from stages.tokenizer import load
    from stages.tracer.reprs import MARKER

    records = _sized_records(12)
    for r in records[1::2]:   # cut short, in the record's result and its trace's return frames
        cut = r["result"][:-1] + MARKER
        r["trace"] = r["trace"].replace(json.dumps(r["result"]), json.dumps(cut))
        r["result"] = cut
    params, _ = _stage_root(tmp_path, records, max_programs=100, max_program_tokens=10_000,
                            max_new_tokens=10_000, output_max_new_tokens=10_000)
    tok = load(Storage(str(tmp_path)))
    held = {r["id"]: r for r in records if heldout(corpus_id(r), 50.0)}
    cut = {i for i, r in held.items() if r["result"].endswith(MARKER)}
    assert cut and set(held) - cut
    counts = {"heldout_traces": 0, "skipped_no_task": 0, "skipped_broken": 0,
              "skipped_too_long": 0}
    programs = heldout_programs(params, Storage(str(tmp_path)), tok, counts)
    assert {p["id"] for p in programs} == set(held)
    assert {p["id"] for p in programs if not p["output_task"]} == cut
    assert counts["skipped_output_truncated"] == len(cut)
    assert counts["skipped_output_too_long"] == 0
    assert counts["output_tasks"] == len(held) - len(cut)
    assert all(p["result"] == held[p["id"]]["result"] for p in programs)   # output_from_trace


# --- on a tiny trained checkpoint (tokenizer, pack and pretrain stages run for real) ----------

# The fixture's 6 held-out traces are 106 to 256 tokens: max_new_tokens lets each be answered
# (a longer trace is not drawn), and generation stops at its length + 25% + 16 anyway.
EVAL = {"max_programs": 4, "max_program_tokens": 600, "max_new_tokens": 256,
        "output_max_new_tokens": 8, "ppl_seq_length": 32, "ppl_max_tokens": 512}

needs_sandbox = pytest.mark.skipif(shutil.which("bwrap") is None,
                                   reason="bubblewrap (the sandbox) is not installed")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (the sandbox) is not installed")
    from tests.train_fixtures import build_eval_root

    root = tmp_path_factory.mktemp("evaluate")
    build_eval_root(root, evaluate=EVAL)
    return root


KV_CHECK = """
import json, sys
from pathlib import Path
from codeworld.config import load_params
from codeworld.storage import Storage
from codeworld.shards import Dataset
from model.generate import load, one_thread
from stages.tokenizer import load as load_tok
root = Path(sys.argv[1])
params = load_params(root / "params.yaml")
tok = load_tok(Storage(str(root)))
lm = load(params, root / "checkpoints" / "pretrain", tok.get_vocab_size())
out = []
one_thread().__enter__()   # both paths on one thread: the machine's other work stays out of it
for r in list(Dataset(Storage(str(root)).sub("traces")))[:2]:
    ids = tok.encode(r["prompt"]).ids
    greedy = [lm.sample(ids, max_new_tokens=32, stop_ids={0}, cache=c) for c in (True, False)]
    sampled = [lm.sample(ids, n=3, max_new_tokens=16, temperature=1.0, seed=7, cache=c)
               for c in (True, False)]
    out.append({"greedy": greedy, "sampled": sampled})
print(json.dumps(out))
"""


def test_kv_cache_decoding_equals_full_recomputation(root):
    proc = subprocess.run([sys.executable, "-c", KV_CHECK, str(root)], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in json.loads(proc.stdout.strip().splitlines()[-1]):
        cached, full = case["greedy"]
        assert cached == full and len(cached[0]) > 0
        assert case["sampled"][0] == case["sampled"][1]


def _evaluate(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", "evaluate", "--params",
                           str(root / "params.yaml"), "--no-track"], cwd=root,
                          capture_output=True, text=True, timeout=900)


def test_evaluate_stage_writes_metrics_predictions_and_the_report(root):
    # a second phase checkpoint (the same weights as "midtrain"): evaluated after pretrain,
    # on the same programs, side by side in the report
    shutil.copytree(root / "checkpoints" / "pretrain", root / "checkpoints" / "midtrain")
    proc = _evaluate(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert metrics["phases_evaluated"] == 2 and metrics["programs"] == 4
    for phase in ("pretrain", "midtrain"):
        for name in ("valid_format", "state_exact_match", "action_exact_match", "key_match",
                     "key_value_match", "output_exact_match", "ppl_code", "ppl_traces",
                     "next_frame_exact", "next_state_exact", "next_action_exact"):
            assert 0 <= metrics[f"{phase}.{name}"] <= (1 if "ppl" not in name else 1e9)
        rows = [json.loads(l) for l in (root / "evaluate" / f"{phase}.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all("predicted" in r and "metrics" in r for r in rows)
    # same weights, same greedy answers: the phases agree to the last digit
    assert metrics["pretrain.state_exact_match"] == metrics["midtrain.state_exact_match"]
    summary = json.loads((root / "evaluate" / "summary.json").read_text())
    assert summary["missing"] == ["sft", "rl"] and len(summary["programs"]) == 4
    run_fp = json.loads((root / "checkpoints" / "pretrain" / "run.json").read_text())["fingerprint"]
    assert summary["phases"]["pretrain"]["run_fingerprint"] == run_fp
    assert summary["phases"]["pretrain"]["iteration"] == 4
    held = {r["provenance"]["corpus_id"] for r in _traces(root)
            if r["id"] in summary["programs"]}
    from codeworld.split import heldout
    assert held and all(heldout(c, 10.0, 0) for c in held)   # only held-out programs
    report = (root / "reports" / "evaluate.md").read_text()
    assert "| metric | pretrain | midtrain |" in report
    assert "Mid-training effect" in report and "state exact match" in report
    assert "| next frame exact |" in report and "trace NLL per token" in report
    assert metrics["pretrain.trace_nll"] > 0
    for png in ("pretrain.png", "midtrain.png", "phases.png"):
        assert (root / "reports" / "evaluate" / png).stat().st_size > 1000
        assert f"evaluate/{png}" in report
    # deterministic: a rerun writes the same report and predictions
    before = {p: (root / p).read_bytes() for p in ("reports/evaluate.md", "evaluate/pretrain.jsonl",
                                                   "evaluate/summary.json")}
    assert _evaluate(root).returncode == 0
    assert before == {p: (root / p).read_bytes() for p in before}


def _traces(root: Path) -> list[dict]:
    from codeworld.shards import Dataset
    from codeworld.storage import Storage

    return list(Dataset(Storage(str(root)).sub("traces")))


def test_a_prediction_nested_too_deep_is_a_defect_not_a_crash():
    # json.loads raises RecursionError (not a ValueError) at ~1000 levels: a model's LOCALS or
    # VALUE that deep crashed the parser, and with it the evaluation of every program
    deep = "[" * 5000
    for text in (f'<|line_sep|>{{"a": {deep}<|action_sep|>    return f(1)\n<|frame_sep|>',
                 f'<|return_sep|><|action_sep|>    return x\n<|arg_sep|>{deep}<|frame_sep|>'):
        parsed = parse(text + "<|end_of_text|>")
        assert not parsed.valid and parsed.errors


def test_the_rl_figures_are_of_the_evaluated_iteration_from_the_phase_log(tmp_path):
    # An RL run killed after step 10 with its last save at 6: evaluation of iter 6 took its
    # curve to step 10 and its figures from metrics/rl.json when that file was beside the
    # metrics (the mean of another run's or all 10 steps: 0.55), else from step 10 alone under
    # the same names (reward_mean 1.0): never the figures of the weights it evaluated.
    from stages.evaluate import rl_curve

    rows = [{"step": s, "loss": 1.0, "reward_mean": s / 10, "success_rate": 0.1 * (s % 3),
             "reward_output": s / 20} for s in range(1, 11)]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve, final = rl_curve(tmp_path, 6)
    assert [p["step"] for p in curve] == [1, 2, 3, 4, 5, 6]
    assert curve[-1] == {"step": 6, "reward_mean": 0.6, "success_rate": 0.0, "reward_output": 0.3}
    # the rl stage's own sums (stages/rl_figures.summary) over steps 1..6
    assert final == {"reward_first": 0.1, "reward_last": 0.6, "reward_mean": 0.35,
                     "success_rate": 0.1, "reward_output_mean": 0.175}
    assert rl_curve(tmp_path / "none", 6) == ([], {})   # no log: no figures


def test_a_held_out_trace_without_an_id_is_counted_not_fatal(tmp_path):
    # str(record["id"]): one trace record without an id stopped the evaluate (and export) stage
    # with a bare KeyError: 'id', after its phases' checkpoints were checked.
    from codeworld.split import corpus_id, heldout
    from stages.evaluate import heldout_programs
    from stages.tokenizer import load

    records = _sized_records(12)
    held = [r for r in records if heldout(corpus_id(r), 50.0)]
    del held[0]["id"]   # still held out: its provenance's corpus_id decides
    params, _ = _stage_root(tmp_path, records, max_programs=100, max_program_tokens=10_000,
                            max_new_tokens=10_000, output_max_new_tokens=10_000)
    counts = {"heldout_traces": 0, "skipped_no_task": 0, "skipped_broken": 0,
              "skipped_too_long": 0}
    programs = heldout_programs(params, Storage(str(tmp_path)), load(Storage(str(tmp_path))), counts)
    assert {p["id"] for p in programs} == {r["id"] for r in held[1:]}
    assert counts["skipped_broken"] == 1 and counts["heldout_traces"] == len(held)


def test_the_perplexity_of_a_diverged_model_is_infinite_not_a_crash():
    # A checkpoint confidently wrong by 1000 nats per token (a run that blew up): math.exp(1000)
    # raised OverflowError and the evaluate stage stopped after all its generation.
    import math

    import torch

    from stages.evaluate import perplexity

    class Diverged:
        def logits(self, toks):
            out = torch.zeros(*toks.shape, 8)
            out[..., 0] = 1000.0
            return out

    got = perplexity(Diverged(), [1, 2, 3, 4, 5], [1, 1, 1, 1, 1], 4)
    assert got["tokens"] == 4 and got["nll"] == 1000.0 and math.isinf(got["ppl"])


def test_the_rl_counts_of_a_checkpoint_between_logged_steps_are_its_own(tmp_path, monkeypatch,
                                                                        caplog):
    """rl.log_interval 3, a save at step 4 and the run killed at step 5: the steps log holds
    step 3 only, and evaluation of iter 4 took the agent figures from step 3's totals (the
    agent's success 0.5 of 2 episodes where the weights saw 4, 0.75). The checkpoint's own
    run_state (checkpoint.RUN_STATE: the totals at its step) gives them; a checkpoint saved
    without one keeps the rows' figures. With every step logged both agree, as before."""
    from model import checkpoint
    from stages.evaluate import rl_curve, run
    from stages.rl_figures import add_step, summary

    params, sha = _stage_root(tmp_path)
    ckdir = _phase(tmp_path, "rl", sha, iteration=4)
    # agent episodes on even steps (rl.agent_interval 2): 2 at step 2 (success 0.5), 2 at 4 (1.0)
    steps = [{"step": s, "updated": 1, "reward_mean": s / 10, "success_rate": 0.25,
              **({"agent_episodes": 2, "agent_broken": 0, "agent_reward_mean": s / 4}
                 if s % 2 == 0 else {})} for s in (1, 2, 3, 4, 5)]
    totals, logged, at = {}, [], {}
    for r in steps:
        totals = add_step(totals, r)
        at[r["step"]] = totals
        if r["step"] % 3 == 0:
            logged.append({**r, **totals})
    (ckdir / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
    it = ckdir / "iter_0000004"
    (it / checkpoint.RUN_STATE).write_text(json.dumps(at[4], sort_keys=True) + "\n")
    (it / "codeworld_files.json").write_text(json.dumps(
        {"__0_0.distcp": 10, checkpoint.RUN_STATE: (it / checkpoint.RUN_STATE).stat().st_size}))
    _stand_in(monkeypatch)

    def evaluated() -> dict:
        run(params, track=False, metrics_path=None, report_path=None)
        return _summary(tmp_path)["phases"]["rl"]

    got = evaluated()
    want = summary(steps[:4])["agent_success_rate"]
    assert want == 0.75 and summary(logged)["agent_success_rate"] == 0.5
    assert got["rl_agent_success_rate"] == want
    assert [p["step"] for p in got["rl_curve"]] == [3] and got["rl_reward_mean"] == 0.3
    # a checkpoint before any logged step (iter 2): no curve, its own agent figures
    assert rl_curve(ckdir, 2, at[2]) == ([], {"agent_success_rate": 0.5})
    assert rl_curve(ckdir, 2, None) == ([], {})
    # a run_state that is not JSON (of its saved size: damage() passes it): said, the file
    # named, the rows' figures, the stage goes on
    size = (it / checkpoint.RUN_STATE).stat().st_size
    (it / checkpoint.RUN_STATE).write_text("{" + " " * (size - 1))
    with caplog.at_level("WARNING", logger="stages.evaluate"):
        assert evaluated()["rl_agent_success_rate"] == 0.5
    assert f"{it / checkpoint.RUN_STATE}: not valid JSON" in caplog.text
    # saved before checkpoints carried the totals: the last logged row's, as before
    (it / checkpoint.RUN_STATE).unlink()
    (it / "codeworld_files.json").write_text(json.dumps({"__0_0.distcp": 10}))
    assert evaluated()["rl_agent_success_rate"] == 0.5
    # every step logged (the default): the row at the checkpoint and its run_state agree,
    # the figures the same bytes with or without the run_state
    every = [{**r, **at[r["step"]]} for r in steps[:4]]
    (ckdir / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in every))
    without = evaluated()
    (it / checkpoint.RUN_STATE).write_text(json.dumps(at[4], sort_keys=True) + "\n")
    assert json.dumps(evaluated(), sort_keys=True) == json.dumps(without, sort_keys=True)
    assert without["rl_agent_success_rate"] == want
