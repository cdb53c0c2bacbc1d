"""`codeworld debug FILE.py --call "f(1, 2)"`: CWM's neural debugger, pdb-like.

The program runs once in the sandbox under the tracer (stages/trace_runner.py, as the traces
stage runs it) for the real frames; the model is asked the prompt the traces stage writes for
that program and call (`<|trace_context_start|>` + context with the synthetic `main` +
`<|frame_sep|>`), and predicts the frames greedily, one frame at a time as the session needs
them, until its trace ends or breaks the format (a `..` slip does not stop it). The session walks
the predicted frames, each shown beside the real frame at the same position, mismatches
marked: in colour on a terminal, with `!` and a list of the differing names otherwise (piped
output, tests).

Commands: s/step, n/next (over calls), o/out/finish (until the scope is left), p/print NAME,
b/back, reset, l/list, w/where, c/continue (to the last frame), h/help, q/quit. An empty line
repeats the last command, as in pdb.
"""

from __future__ import annotations

import json
import logging
import sys
import tokenize
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from codeworld import prompts
from codeworld.tokens import END_OF_TEXT, EOD_ID, TRACE_TOKENS, reserved_token
from codeworld.trace_metrics import Frame, Parsed, parse

FRAME_SEP = TRACE_TOKENS[1]
FRAME_TOKENS = 512    # a frame longer than this is cut (its prediction ends there)
HELP = """commands:
  s, step          next frame
  n, next          next frame in this scope or a caller (steps over calls)
  o, out, finish   run until this scope is left
  b, back          one frame back
  c, continue      to the last frame
  reset            back to the first frame
  p NAME           NAME in the predicted and the real frame
  l, list          the source around this frame's line
  w, where         the scopes open at this frame
  h, help          this text
  q, quit          leave"""


class DebugError(ValueError):
    """A debug session that cannot start (bad file, call or checkpoint); the message says why."""


class Predictor:
    """The model's frames for one prompt, generated on demand one frame at a time (greedy
    decoding is prefix-consistent: the same tokens as one long generation)."""

    def __init__(self, lm, tok, prompt: str, max_new_tokens: int = 4096):
        self.lm, self.tok = lm, tok
        self.prompt_ids = tok.encode(prompt).ids
        self.frame_sep = tok.token_to_id(FRAME_SEP)
        self.ids: list[int] = []
        self.budget = max_new_tokens
        self.parsed = Parsed()
        self.done = False

    def frames(self, n: int) -> list[Frame]:
        """At least n frames when the model writes that many (fewer once it ends)."""
        while not self.done and len(self.parsed.frames) < n:
            room = self.budget - len(self.ids)
            if room <= 0:
                self.done = True
                break
            new = self.lm.sample(self.prompt_ids + self.ids, max_new_tokens=min(room, FRAME_TOKENS),
                                 stop_ids={self.frame_sep, EOD_ID})[0]
            self.ids += new
            self.parsed = parse(self.text)
            self.done = self._ended(new)
        return self.parsed.frames

    def _ended(self, new: list[int]) -> bool:
        """Whether the model's trace is over after this chunk: it did not end a frame
        (end-of-text, or cut at FRAME_TOKENS or the budget), main's scope is left, or the
        text broke the format (a malformed frame: the parser reads no further). A semantic
        slip, such as a `..` with nothing to resolve to, is no end: the frames go on, as in
        the one long generation evaluate scores."""
        return (not new or new[-1] != self.frame_sep or self.parsed.left_main
                or self.parsed.broken is not None)

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=False)


class Style:
    """Mismatch marks: ANSI colours on a terminal, plain `!` markers otherwise."""

    def __init__(self, color: bool):
        self.color = color

    def bad(self, s: str) -> str:
        return f"\x1b[1;31m{s}\x1b[0m" if self.color else s

    def good(self, s: str) -> str:
        return f"\x1b[32m{s}\x1b[0m" if self.color else s

    def dim(self, s: str) -> str:
        return f"\x1b[2m{s}\x1b[0m" if self.color else s


def _locals_text(fr: Frame, other: Frame | None, style: Style) -> tuple[str, list[str]]:
    """`name=value` pairs (mismatches against `other` marked) and the names that differ."""
    if fr.kind not in ("call", "line"):
        same = other is not None and other.kind == fr.kind and other.value == fr.value
        text = f"value={fr.value}"
        return (text if same or other is None else style.bad(text)), ([] if same else ["<value>"])
    theirs = other.locals if other is not None and other.kind in ("call", "line") else None
    parts, diff = [], []
    for k, v in fr.locals.items():
        ok = theirs is not None and theirs.get(k) == v
        parts.append(f"{k}={v}" if ok or theirs is None else style.bad(f"{k}={v}"))
        if not ok:
            diff.append(k)
    if theirs is not None:
        diff += [k for k in theirs if k not in fr.locals]
    return "{" + ", ".join(parts) + "}", diff


@dataclass
class Session:
    """A cursor over the predicted frames, with the real frame at the same position beside it."""

    predictor: Predictor
    real: Parsed | None             # None when the program could not be traced
    real_lines: list[int]           # context line of each real frame
    context: str
    out: TextIO = sys.stdout
    style: Style = field(default_factory=lambda: Style(False))
    pos: int = 0
    last: str = "step"

    # --- frames -----------------------------------------------------------------------------
    def pred(self, i: int) -> Frame | None:
        frames = self.predictor.frames(i + 1)
        return frames[i] if i < len(frames) else None

    def realf(self, i: int) -> Frame | None:
        if self.real is None or i >= len(self.real.frames):
            return None
        return self.real.frames[i]

    def frame(self, i: int) -> Frame | None:
        """The frame the cursor walks: the prediction's, the real one past its end."""
        return self.pred(i) or self.realf(i)

    def count(self) -> int:
        self.predictor.frames(10 ** 9)
        return max(len(self.predictor.parsed.frames), len(self.real.frames) if self.real else 0)

    def line_of(self, i: int) -> int | None:
        """Frame i's line in the context: the real frame's (the tracer knows it), past the real
        trace's end the predicted frame's (None when its source is not a line there)."""
        if i < len(self.real_lines) and self.realf(i) is not None:
            return self.real_lines[i]
        return self.pred_line(i)

    def pred_line(self, i: int) -> int | None:
        """The line the predicted frame i names: the real one when their sources agree, else
        the first context line with the predicted source (None when there is none)."""
        p, r = self.pred(i), self.realf(i)
        if p is None:
            return None
        if r is not None and p.source == r.source and i < len(self.real_lines):
            return self.real_lines[i]
        # lines as Python and the tracer count them: at "\n" only (str.splitlines also breaks
        # at a form feed, \v, U+2028...)
        lines = self.context.split("\n")
        source = p.source[:-1]   # (a frame's source ends with its "\n")
        return lines.index(source) + 1 if source in lines else None

    # --- output ----------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        print(text, file=self.out)

    def show(self) -> None:
        p, r = self.pred(self.pos), self.realf(self.pos)
        fr = p or r
        if fr is None:
            self.say("(no frame)")
            return
        total = len(self.real.frames) if self.real else "?"
        line, pline = self.line_of(self.pos), self.pred_line(self.pos)
        # the real frame's line; the predicted one beside it when the prediction names another
        where = f"line {line or '?'}"
        if p is not None and r is not None and pline != line:
            where += f" (pred: line {pline or '?'})"
        self.say(f"[frame {self.pos + 1}, {total} real] {where}, depth {fr.depth}")
        action_ok = p is not None and r is not None and p.action == r.action
        if r is not None:
            locs, _ = _locals_text(r, None, self.style)
            self.say(f"  real: {r.kind:9} {r.source.rstrip()}")
            self.say(f"        {locs}")
        else:
            self.say("  real: " + ("(no real trace)" if self.real is None else "(trace ended)"))
        if p is not None:
            locs, diff = _locals_text(p, r, self.style)
            mark = " " if r is None or (action_ok and not diff) else "!"
            act = f"{p.kind:9} {p.source.rstrip()}"
            self.say(f"{mark} pred: {act if action_ok or r is None else self.style.bad(act)}")
            self.say(f"        {locs}")
            notes = []
            if r is not None and not action_ok:
                notes.append("action differs")
            if r is not None and diff:
                notes.append("differs: " + ", ".join(diff))
            if notes:
                self.say("        " + self.style.bad("; ".join(notes)))
            elif r is not None:
                self.say("        " + self.style.good("match"))
        else:
            # the format break it stopped at; a `..` slip in an earlier frame is not why
            why = self.predictor.parsed.broken or "the model ended its trace"
            self.say(f"! pred: (none: {why})")

    # --- commands --------------------------------------------------------------------------
    def step(self, _arg: str = "") -> None:
        if self.frame(self.pos + 1) is None:
            self.say("(at the last frame)")
            return
        self.pos += 1
        self.show()

    def next(self, _arg: str = "") -> None:
        here = self.frame(self.pos)
        depth = here.depth if here else 0
        i = self.pos + 1
        while (fr := self.frame(i)) is not None and fr.depth > depth:
            i += 1
        if fr is None:
            self.say("(at the last frame)")
            return
        self.pos = i
        self.show()

    def out_(self, _arg: str = "") -> None:
        here = self.frame(self.pos)
        depth = here.depth if here else 0
        i = self.pos + 1
        while (fr := self.frame(i)) is not None and not (
                fr.depth < depth or (fr.depth == depth and fr.kind == "return")):
            i += 1
        if fr is None:
            self.say("(the scope is not left before the trace ends)")
            return
        self.pos = i
        self.show()

    def back(self, _arg: str = "") -> None:
        if self.pos == 0:
            self.say("(at the first frame)")
            return
        self.pos -= 1
        self.show()

    def reset(self, _arg: str = "") -> None:
        self.pos = 0
        self.show()

    def cont(self, _arg: str = "") -> None:
        self.pos = max(0, self.count() - 1)
        self.show()

    def print_(self, name: str) -> None:
        if not name:
            self.say("usage: p NAME")
            return
        for label, fr in (("pred", self.pred(self.pos)), ("real", self.realf(self.pos))):
            if fr is None:
                self.say(f"{label}: (no frame)")
            elif fr.kind not in ("call", "line"):
                self.say(f"{label}: ({fr.kind} frame: no locals; value {fr.value})")
            else:
                value = fr.locals.get(name)
                self.say(f"{label}: {name} = {value}" if value is not None
                         else f"{label}: {name} is not a local here")

    def list_(self, _arg: str = "") -> None:
        """The source around the frame's line (`->`); `p>` marks the line the prediction names
        when it is another one."""
        line, pline = self.line_of(self.pos), self.pred_line(self.pos)
        lines = self.context.removesuffix("\n").split("\n")   # (as pred_line counts them)
        centre = line or pline or 1
        for n in range(max(1, centre - 5), min(len(lines), centre + 5) + 1):
            mark = "->" if n == line else "p>" if n == pline else "  "
            self.say(f"{n:4} {mark} {lines[n - 1]}")

    def where(self, _arg: str = "") -> None:
        for label, get in (("pred", self.pred), ("real", self.realf)):
            stack = ["main"]
            for i in range(self.pos + 1):
                fr = get(i)
                if fr is None:
                    break
                del stack[fr.depth + 1:]
                if fr.kind == "call":
                    stack.append(fr.source.strip())
            self.say(f"{label}: " + " > ".join(stack))

    def run(self, stdin: TextIO) -> None:
        commands = {"s": self.step, "step": self.step, "n": self.next, "next": self.next,
                    "o": self.out_, "out": self.out_, "finish": self.out_, "b": self.back,
                    "back": self.back, "reset": self.reset, "c": self.cont,
                    "continue": self.cont, "p": self.print_, "print": self.print_,
                    "l": self.list_, "list": self.list_, "w": self.where, "where": self.where}
        echo = not getattr(stdin, "isatty", lambda: False)()
        self.show()
        while True:
            print("(cwdb) ", end="", file=self.out, flush=True)
            raw = stdin.readline()
            if not raw:   # end of input: a piped session ends like `quit`
                self.say()
                return
            cmd = raw.strip() or self.last
            if echo:
                self.say(cmd)
            name, _, arg = cmd.partition(" ")
            if name in ("q", "quit", "exit"):
                return
            if name in ("h", "help", "?"):
                self.say(HELP)
                continue
            fn = commands.get(name)
            if fn is None:
                self.say(f"unknown command {name!r} (h for help)")
                continue
            self.last = cmd
            fn(arg.strip())


def default_checkpoint(params) -> tuple[str, Path]:
    """The last phase, in training order, whose checkpoint exists."""
    from codeworld.config import PHASES
    from model import checkpoint
    from stages.train_phase import phase_dir

    for phase in reversed((*PHASES, "rl")):
        d = phase_dir(params, phase)
        if checkpoint.latest(d) is not None:
            return phase, d
    raise DebugError(f"no trained checkpoint under {phase_dir(params, 'pretrain').parent} "
                     "(run the training stages, or pass --checkpoint)")


def _checkpoint(params, path: str | None) -> tuple[str, Path, Path | None]:
    """(phase, phase dir, iteration dir or None) for --checkpoint: a phase directory (its
    latest.json) or one iter_N directory of it."""
    from codeworld.config import PHASES

    if path is None:
        phase, d = default_checkpoint(params)
        return phase, d, None
    p = Path(path)
    if (p / "latest.json").exists():
        phase_dir, it = p, None
    elif p.is_dir() and p.name.startswith("iter_"):
        phase_dir, it = p.parent, p
    else:
        raise DebugError(f"--checkpoint {path}: not a phase checkpoint directory (no latest.json) "
                         "nor an iter_N directory")
    phase = phase_dir.name if phase_dir.name in (*PHASES, "rl") else "pretrain"
    return phase, phase_dir, it


class ExportedModel:
    """A `codeworld export` folder through transformers alone (no Megatron): the debugger's
    model for whoever has the export and not the checkpoint. Greedy, as the checkpoint's."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        path = Path(folder)
        try:
            manifest = json.loads((path / "codeworld.json").read_text())
            self.phase, self.iteration = manifest["phase"], int(manifest["iteration"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DebugError(f"--hf {folder}: not a finished codeworld export (its codeworld.json, "
                             f"written last: {err})") from None
        missing = [name for name in manifest.get("files", ()) if not (path / name).is_file()]
        if missing:
            raise DebugError(f"--hf {folder}: {', '.join(missing)} missing from the export")
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()   # a loading bar between the session's lines
        self.checkpoint = path
        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()

    def sample(self, prompt: list[int], *, max_new_tokens: int, stop_ids, **_) -> list[list[int]]:
        import torch

        with torch.no_grad():
            out = self.model.generate(torch.tensor([prompt]), do_sample=False,
                                      max_new_tokens=max_new_tokens, eos_token_id=sorted(stop_ids),
                                      pad_token_id=EOD_ID)
        return [out[0, len(prompt):].tolist()]


def trace_real(code: str, call: str, params, wall_seconds: float) -> dict:
    """The program run once in the sandbox under the tracer: the traces stage's record."""
    from stages.trace_runner import trace_requests

    limits = params.traces.limits.model_copy(update={"wall_seconds": wall_seconds,
                                                     "cpu_seconds": wall_seconds})
    return trace_requests([{"id": "debug", "code": code, "call": call}], limits, workers=1,
                          batch_size=1, frames=True)[0]


def start(file: str, call: str, params, *, checkpoint: str | None = None, hf: str | None = None,
          wall_seconds: float = 5.0, max_new_tokens: int = 4096,
          out: TextIO = sys.stdout, color: bool = False) -> Session:
    """Trace the program, load the model (a phase checkpoint, or with `hf` an exported
    folder), and return the session (not yet run)."""
    from model import generate
    from codeworld.storage import Storage
    from stages import pack as pack_stage
    from stages import tokenizer as tokenizer_stage
    from stages.tracer.frames import prompt_for
    from stages.tracer.program import InvalidProgram, context_of

    try:   # as Python reads a source file: a UTF-8 BOM or a coding cookie decides the encoding
        with tokenize.open(file) as f:
            code = f.read()
    except (OSError, UnicodeDecodeError, SyntaxError) as err:   # SyntaxError: a bad cookie
        raise DebugError(f"{file}: cannot read: {err}") from None
    # The file and the call must compile: else the sandbox reports them "invalid" and there is
    # no real trace to compare with (a program that raises when run is fine: that is traced).
    try:
        compile(code, file, "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        # ValueError: null bytes, on some versions; RecursionError: nesting too deep to parse
        where = f"{file}:{err.lineno}" if getattr(err, "lineno", None) else file
        raise DebugError(f"{where}: {type(err).__name__}: {getattr(err, 'msg', err)}") from None
    for what, text in ((file, code), (f"--call {call!r}", call)):
        if token := reserved_token(text):   # the model would read it as the format's markup
            raise DebugError(f"{what}: holds {token!r}, a token of the trace format; a program "
                             f"to debug must not spell one")
    try:
        context = context_of(code, call)
        compile(call.strip(), "<call>", "eval", dont_inherit=True)
    except InvalidProgram as err:
        raise DebugError(f"--call {call!r}: {err}") from None
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise DebugError(f"--call {call!r}: not an expression: {getattr(err, 'msg', err)}") from None
    record = trace_real(code, call, params, wall_seconds)
    real, lines = None, []
    if record["status"] in ("ok", "exception") and record.get("trace") is not None:
        real = parse(record["trace"] + END_OF_TEXT)
        lines = [f["line"] for f in (record.get("frames") or [])[1:]]
    else:
        print(f"(no real trace: {record['status']}: {record.get('error')})", file=out)
    prompt = prompts.trace_prompt({"prompt": record.get("prompt") or prompt_for(context)})
    if hf is not None:
        lm = ExportedModel(hf)
        print(f"model: {lm.phase} export {hf} (iteration {lm.iteration}, through transformers); "
              f"program traced: {record['status']}", file=out)
        return Session(Predictor(lm, lm.tok, prompt, max_new_tokens), real, lines, context, out,
                       Style(color))
    phase, ckdir, iteration_dir = _checkpoint(params, checkpoint)
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    from stages.evaluate import tokenizer_mismatch

    if why := tokenizer_mismatch(ckdir, storage):   # its ids would be other text: nonsense frames
        raise DebugError(f"{why}: the checkpoint cannot be read with this tokenizer")
    tok = tokenizer_stage.load(storage)
    try:
        pack = json.loads((pack_stage.local_dir(params) / pack_stage.MANIFEST).read_text())
        vocab = int(pack["vocab_size"])
    except (OSError, ValueError, KeyError):
        vocab = tok.get_vocab_size()
    # Megatron's import-time notes (no Transformer Engine, no Apex...) are not the user's concern
    logging.getLogger("megatron").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = generate.load(params, ckdir, vocab, phase, iteration_dir=iteration_dir)
    print(f"model: {phase} checkpoint {lm.checkpoint} (iteration {lm.iteration}); "
          f"program traced: {record['status']}", file=out)
    return Session(Predictor(lm, tok, prompt, max_new_tokens), real, lines, context, out,
                   Style(color))
