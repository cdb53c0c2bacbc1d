"""The neural debugger: a pdb-like session over predicted frames beside the real ones from the
sandboxed tracer, driven through stdin. The REPL's logic is checked against a replaying model
(it writes a given trace token by token, as a model's sample() does), the whole command end to
end with a tiny trained checkpoint."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from codeworld.debugger import Predictor, Session, Style
from codeworld.tokens import END_OF_TEXT, SPECIAL_TOKENS
from codeworld.trace_metrics import parse
from stages.tracer import trace_call

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="bubblewrap (the sandbox) is not installed")
REPO = Path(__file__).resolve().parents[1]
PROGRAM = """\
def helper(v):
    w = v * 2
    return w

def f(a, b):
    c = helper(a)
    d = c + b
    return d
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from tests.train_fixtures import build_eval_root

    root = tmp_path_factory.mktemp("debugger")
    build_eval_root(root)
    (root / "prog.py").write_text(PROGRAM)
    return root


@pytest.fixture(scope="module")
def tok(root):
    from codeworld.storage import Storage
    from stages.tokenizer import load

    return load(Storage(str(root)))


class Replay:
    """A stand-in model that writes `text` (a trace) whatever it is asked: sample() continues
    from where the prompt's tail leaves it, stopping after a stop token, as the real one does."""

    def __init__(self, tok, prompt: str, text: str):
        self.base = len(tok.encode(prompt).ids)
        self.ids = tok.encode(text + END_OF_TEXT).ids

    def sample(self, prompt, *, max_new_tokens, stop_ids, **_):
        done = len(prompt) - self.base
        out = []
        for t in self.ids[done:done + max_new_tokens]:
            out.append(t)
            if t in stop_ids:
                break
        return [out]


def session(tok, predicted_text: str | None = None, color: bool = False,
            program: str = PROGRAM) -> tuple[Session, io.StringIO]:
    r = trace_call(program, "f(2, 3)")
    out = io.StringIO()
    lm = Replay(tok, r.prompt, predicted_text if predicted_text is not None else r.text)
    lines = [f.line for f in r.frames[1:]]
    context = r.prompt.split("<|trace_context_start|>", 1)[1].rsplit("<|frame_sep|>", 1)[0]
    s = Session(Predictor(lm, tok, r.prompt), parse(r.text + END_OF_TEXT), lines, context, out,
                Style(color))
    return s, out


def drive(s: Session, out: io.StringIO, commands: str) -> list[str]:
    """Run the REPL on piped commands; the transcript split at each prompt."""
    s.run(io.StringIO(commands))
    return out.getvalue().split("(cwdb) ")


def test_a_correct_prediction_matches_every_frame_and_the_commands_walk_it(tok):
    s, out = session(tok)
    t = drive(s, out, "s\ns\nn\np c\nw\nb\nb\nb\nl\no\nreset\nc\n\nq\n")
    # t[0]: the first frame; then each command's output after its echoed name
    assert "real: line          return f(2, 3)" in t[0] and "match" in t[0]
    assert t[1].startswith("s\n") and "call      def f(a, b):" in t[1] and "{a=2, b=3}" in t[1]
    assert "[frame 3, 11 real] line 6, depth 1" in t[2] and "c = helper(a)" in t[2]
    # next steps over helper's frames to the caller's next line, c now bound
    assert t[3].startswith("n\n[frame 8,") and "d = c + b" in t[3] and "c=4" in t[3]
    assert t[4] == "p c\npred: c = 4\nreal: c = 4\n"
    assert t[5] == "w\npred: main > def f(a, b):\nreal: main > def f(a, b):\n"
    assert "[frame 7," in t[6] and "return        return w" in t[6] and "value=4" in t[6]
    assert "[frame 5, 11 real] line 2, depth 2" in t[8] and "w = v * 2" in t[8]   # back x3
    assert "   2 ->     w = v * 2" in t[9]                                        # list
    assert t[10].startswith("o\n[frame 7,") and "return w" in t[10]   # out: helper's return
    assert "[frame 1, 11 real]" in t[11]                                        # reset
    assert "[frame 11, 11 real]" in t[12] and "value=7" in t[12]               # continue
    assert t[13].startswith("c\n[frame 11,")                    # an empty line repeats `c`
    assert t[14] == "q\n"
    assert "!" not in "".join(line[:2] for line in out.getvalue().splitlines())


def test_a_wrong_local_is_marked_and_named(tok):
    r = trace_call(PROGRAM, "f(2, 3)")
    wrong = r.text.replace('"d": "7"', '"d": "8"')
    assert wrong != r.text
    s, out = session(tok, wrong)
    drive(s, out, "c\nb\nb\np d\nq\n")
    text = out.getvalue()
    assert "! pred: line          return d" in text and "differs: d" in text
    assert "pred: d = 8\nreal: d = 7" in text
    s, out = session(tok, wrong, color=True)
    drive(s, out, "c\nb\nb\nq\n")
    assert "\x1b[1;31md=8\x1b[0m" in out.getvalue()   # in colour on a terminal


def test_a_prediction_that_ends_early_is_said_and_the_real_frames_go_on(tok):
    r = trace_call(PROGRAM, "f(2, 3)")
    cut = r.text[:r.text.index("<|frame_sep|>") + len("<|frame_sep|>")] + "garbage"
    s, out = session(tok, cut)
    drive(s, out, "s\ns\nq\n")
    text = out.getvalue()
    assert "! pred: (none: text after the last <|frame_sep|>" in text
    assert "real: line          c = helper(a)" in text


class CharTokenizer:
    """A stand-in tokenizer (special tokens whole, any other character one token): the
    predictor's logic without a trained tokenizer."""

    def __init__(self):
        self.special = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        self.names = {i: t for t, i in self.special.items()}

    def token_to_id(self, token: str) -> int | None:
        return self.special.get(token)

    def encode(self, text: str) -> SimpleNamespace:
        ids, i = [], 0
        while i < len(text):
            token = next((t for t in self.special if text.startswith(t, i)), text[i])
            ids.append(self.special[token] if token in self.special else 1000 + ord(token))
            i += len(token)
        return SimpleNamespace(ids=ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.names[i] if i in self.names else chr(i - 1000) for i in ids)


def test_a_semantic_slip_does_not_end_the_prediction():
    # frame 3 (`c = helper(a)`) keeps a local `z` "unchanged" that never was: a '..' with
    # nothing to resolve to, not a broken format; one long generation (what evaluate scores)
    # goes on past it, and so must the frame-by-frame one
    tok = CharTokenizer()
    r = trace_call(PROGRAM, "f(2, 3)")
    slip = r.text.replace('{"a": "..", "b": ".."}', '{"a": "..", "b": "..", "z": ".."}', 1)
    assert slip != r.text
    s, out = session(tok, slip)
    t = drive(s, out, "c\nq\n")
    assert "not a local" in s.predictor.parsed.errors[0]
    assert len(s.predictor.parsed.frames) == len(parse(slip + END_OF_TEXT).frames) == 11
    assert "[frame 11, 11 real]" in t[1] and "pred: return        return f(2, 3)" in t[1]
    # ended early after the slip: the session says the model ended, not the slip
    cut = slip[:slip.index("<|return_sep|>")]
    s, out = session(tok, cut)
    drive(s, out, "c\nq\n")
    assert "! pred: (none: the model ended its trace)" in out.getvalue()


def test_debug_command_with_a_trained_checkpoint_through_stdin(root):
    cmd = [sys.executable, "-m", "codeworld.cli", "debug", str(root / "prog.py"), "--call",
           "f(2, 3)", "--params", str(root / "params.yaml"), "--max-new-tokens", "64"]
    proc = subprocess.run(cmd, input="s\nn\np a\nw\nl\nb\no\nreset\nq\n", capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert f"model: pretrain checkpoint {root}/checkpoints/pretrain/iter_0000004" in text
    assert "program traced: ok" in text
    # the real frames from the sandbox, the model's beside them (a 4-step model: mostly none)
    assert "real: call      def f(a, b):" in text and "{a=2, b=3}" in text
    assert "real: line          c = helper(a)" in text                  # n
    assert "real: return        return d" in text and "value=7" in text   # o
    assert text.count("pred:") >= 8 and text.count("(cwdb) ") == 9
    assert "real: a = 2" in text and "\x1b[" not in text   # piped: plain text
    # an iteration directory works as --checkpoint too
    it = root / "checkpoints" / "pretrain" / "iter_0000004"
    proc = subprocess.run([*cmd, "--checkpoint", str(it)], input="q\n", capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0 and "iteration 4" in proc.stdout


def test_debug_refuses_a_bad_call_or_checkpoint(root):
    base = [sys.executable, "-m", "codeworld.cli", "debug", str(root / "prog.py"),
            "--params", str(root / "params.yaml")]
    proc = subprocess.run([*base, "--call", "f(1; 2)"], input="", capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "--call 'f(1; 2)'" in proc.stderr
    proc = subprocess.run([*base, "--call", "f(1, 2)", "--checkpoint", str(root)], input="",
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "not a phase checkpoint directory" in proc.stderr
    # a checkpoint trained with another tokenizer than the storage root's: its frames would be
    # another text's ids (was: a session of nonsense)
    other = root / "other" / "pretrain"
    shutil.copytree(root / "checkpoints" / "pretrain", other, dirs_exist_ok=True)
    run_json = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**run_json, "tokenizer_sha256": "0" * 64}))
    proc = subprocess.run([*base, "--call", "f(1, 2)", "--checkpoint", str(other)], input="",
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "was trained with tokenizer sha256 000000000000" in proc.stderr
    # a program that spells a token of the format: the model would read it as the markup
    spelled = root / "spelled.py"
    spelled.write_text("def f(a, b):\n    return '<|frame_sep|>' * a\n")
    proc = subprocess.run([*base[:4], str(spelled), *base[5:], "--call", "f(1, 2)"], input="",
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and f"{spelled}: holds '<|frame_sep|>'" in proc.stderr


def test_a_wrong_predicted_line_shows_the_real_line_and_the_predicted_one(tok):
    r = trace_call(PROGRAM, "f(2, 3)")
    # frame 3 (real: line 6, `c = helper(a)`) predicted as a line that is not in the program
    wrong = r.text.replace("<|action_sep|>    c = helper(a)", "<|action_sep|>    c = helpr(a)", 1)
    assert wrong != r.text
    s, out = session(tok, wrong)
    t = drive(s, out, "s\ns\nl\nq\n")
    assert "[frame 3, 11 real] line 6 (pred: line ?), depth 1" in t[2]
    assert "   6 ->     c = helper(a)" in t[3]
    # predicted as another line of the program: both lines named, both marked in `l`
    other = r.text.replace("<|action_sep|>    c = helper(a)", "<|action_sep|>    d = c + b", 1)
    s, out = session(tok, other)
    t = drive(s, out, "s\ns\nl\nq\n")
    assert "[frame 3, 11 real] line 6 (pred: line 7), depth 1" in t[2]
    assert "   6 ->     c = helper(a)" in t[3] and "   7 p>     d = c + b" in t[3]


SWALLOWED = """\
class A:
    @property
    def x(self):
        raise AttributeError("x")

def f(a):
    b = hasattr(a, "x")
    c = b or 1
    return c
"""


def test_next_and_out_after_an_exception_c_code_swallowed():
    # hasattr() swallows the AttributeError of A.x: A.x's scope ends with its exception frame
    # and no return frame; f goes on at depth 1, so `n` from the hasattr line stops at f's
    # next line and `o` from inside A.x leaves it there too
    tok = CharTokenizer()
    r = trace_call(SWALLOWED, "f(A())")
    out = io.StringIO()
    context = r.prompt.split("<|trace_context_start|>", 1)[1].rsplit("<|frame_sep|>", 1)[0]
    s = Session(Predictor(Replay(tok, r.prompt, r.text), tok, r.prompt),
                parse(r.text + END_OF_TEXT), [f.line for f in r.frames[1:]], context, out)
    t = drive(s, out, "s\ns\nn\nw\nb\nb\no\nc\nq\n")
    assert "[frame 3, 10 real] line 7, depth 1" in t[2] and "b = hasattr(a, \"x\")" in t[2]
    assert t[3].startswith("n\n[frame 7, 10 real] line 8, depth 1") and "c = b or 1" in t[3]
    assert t[4] == "w\npred: main > def f(a):\nreal: main > def f(a):\n"
    assert "[frame 5, 10 real] line 4, depth 2" in t[6]               # back x2: raise in A.x
    assert t[7].startswith("o\n[frame 7, 10 real] line 8, depth 1")   # out of A.x
    assert "[frame 10, 10 real]" in t[8] and "value=1" in t[8] and "depth 0" in t[8]


def test_lines_are_counted_as_python_counts_them(tok):
    """A form feed (or \\v, U+2028...) inside a line: str.splitlines broke the context there
    too, so `list` marked the line after the one the frame names."""
    program = "x = 1  # \x0c page\n" + PROGRAM
    s, out = session(tok, program=program)
    t = drive(s, out, "s\ns\nl\nq\n")
    assert "[frame 3, 11 real] line 7, depth 1" in t[2] and "c = helper(a)" in t[2]
    assert "   7 ->     c = helper(a)" in t[3], t[3]
