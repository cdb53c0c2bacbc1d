"""CWM trace text -> frames, and the trace-prediction metrics of CWM's paper (Table 9).

Parsing: a trace is frames, each ended by `<|frame_sep|>` (BRIEF.md, "The CWM trace format"):

    <|call_sep|> / <|line_sep|>  LOCALS <|action_sep|> SOURCE
    <|return_sep|> / <|exception_sep|>  <|action_sep|> SOURCE <|arg_sep|> VALUE

A predicted trace is read up to its first malformed frame (the frames before it still count in
the per-frame metrics; `broken` names the defect) and is `finished` when it ends as a trace
must: main's scope left (its return or exception frame) and end-of-text right after that
frame, nothing cut, nothing after. It is `valid` when it is finished (so every frame is well
formed) and its `".."` are right: none in a call frame, each naming a local of the scope's
previous frame. LOCALS are compared as decoded JSON (name -> repr), so any JSON layout of a
well-formed object (key order, spacing) is valid and equal to the tracer's: the format check
is about the frame structure, the metrics about what the frames say.

`".."` resolution needs the scope of each frame, which the text does not name. The tracer writes
`".."` only against the previous frame when that frame is of the same scope (call frames are
always written in full), so a scope stack rebuilt from the event kinds is enough: a call frame
enters a scope (a function, a comprehension, a resumed generator), a return frame leaves it, an
exception frame stays in the scope it is raised in, and an exception frame right after another
one is the exception propagating into the caller (a scope left by an exception has no return
frame), as is one reported at the caller's current line rather than the scope's own (after an
`except` clause that did not match, or a `finally` whose re-raise emits nothing).

A scope can also end with no frame at all: C code that called it swallows its exception and the
caller goes on (`list()` ending on a `__next__`'s StopIteration, `hasattr` or `getattr` with a
default on an AttributeError, `g.close()` on a generator whose `finally` re-raises the
GeneratorExit). Only a scope an exception was reported in can end so; a line or return frame is
then its caller's (`_swallowed`; every scope in between must have raised too) when the scope
could not have written it: a return at the caller's current line and not at the scope's; a line
written in full right after the scope's own exception frame (nothing of the scope ran since, so
a line of it would write its locals as `..`), or repeating a value of the scope's previous frame
(the tracer writes `..` for those); or a line without some name of the scope (or after a
GeneratorExit: the generator is ending) that has every name of the caller's last frame and one
of its values. And main's exit (its return or exception frame at main's line, `return <call>` at
a top-level body's indentation, where no other scope returns or raises but at its own current
line) closes whatever is still open once the trace had an exception. Where the text cannot tell
(a scope and caller both without locals) the caller's frames stay in the scope: the trace still
ends, valid, at main's exit; only those frames' depth is one too deep. On the default's 2,240
function traces this gives back the tracer's own full-locals frames and its scope depths exactly
(tests/test_evaluate.py checks real tracer output, the four swallowing cases too).

Metrics of one prediction against the real trace (`frame_metrics`). Frames are compared by
position, predicted frame i against real frame i, with no alignment: a frame left out or
inserted shifts every later frame, and those count as misses.
- valid_format: the whole prediction is a well-formed, complete trace (`valid`);
- action_exact_match: share of real frames whose predicted frame has the same event kind and
  source line (the "action": what runs next);
- state_exact_match: share of real frames whose predicted state is equal: the full locals of a
  call/line frame, the value of a return/exception frame (and the same kind);
- key_match: share of real call/line frames whose predicted frame has the same local names;
- key_value_match: per real call/line frame, the (name, value) pairs both agree on over the
  names either has (1 when both are empty), averaged;
- trace_exact_match: a valid prediction with the same number of frames, all with equal action
  and state (a prediction that never writes end-of-text, or goes on after main's exit, is not
  exact however right its frames are: the parser stops reading at main's exit);
- output_from_trace: the prediction is finished with main's return frame and that frame's
  value equals the real return value (programs that returned only). A cut prediction or one
  that goes on past main's exit has no output: the model never said the program ends there.
  A `".."` that resolves to nothing earlier does not void it (the value is written in full).
A predicted frame missing (prediction too short or broken) counts as a miss everywhere.

Next-frame prediction with the real trace so far (`teacher_forced`; not in Table 9, the
neural debugger's step): one forward pass over prompt + real trace; a frame is regenerated
exactly by greedy decoding from the real prefix iff the argmax is right at each of its tokens,
so per frame: next_frame_exact (every token, its <|frame_sep|> included), next_action_exact (the
event token, <|action_sep|> and the source line), next_state_exact (LOCALS, or <|arg_sep|> and
VALUE, given the true tokens before them). These move long before whole generated traces do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from codeworld.tokens import END_OF_TEXT, TRACE_TOKENS

CTX, FRAME_SEP, CALL_SEP, LINE_SEP, RETURN_SEP, EXCEPTION_SEP, ACTION_SEP, ARG_SEP = TRACE_TOKENS
KINDS = {CALL_SEP: "call", LINE_SEP: "line", RETURN_SEP: "return", EXCEPTION_SEP: "exception"}
SAME = ".."
METRICS = ("valid_format", "action_exact_match", "state_exact_match", "key_match",
           "key_value_match", "trace_exact_match")


@dataclass
class Frame:
    kind: str                        # call | line | return | exception
    source: str                      # the source line, indentation and "\n" included
    raw: dict[str, str] | None = None     # LOCALS as written (with "..")
    locals: dict[str, str] | None = None  # LOCALS resolved to full reprs (call/line only)
    value: str | None = None         # return/exception VALUE: the repr (JSON-decoded)
    depth: int = 0                   # scope depth inferred from the events (main = 0)

    @property
    def state(self):
        return self.locals if self.kind in ("call", "line") else self.value

    @property
    def action(self) -> tuple[str, str]:
        return self.kind, self.source


@dataclass
class Parsed:
    frames: list[Frame] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)   # why the text is not a valid trace
    ended: bool = False              # end-of-text seen
    left_main: bool = False          # main's scope was left (its return or exception frame)
    broken: str | None = None        # the format defect reading stopped at, if any
    finished: bool = False           # end-of-text right after main's exit frame (module doc)

    @property
    def valid(self) -> bool:
        return self.finished and not self.errors

    @property
    def returned(self) -> str | None:
        """main's return value when the trace is finished with main returning."""
        if self.finished and self.frames[-1].kind == "return" and self.frames[-1].depth == 0:
            return self.frames[-1].value
        return None


def _str_dict(text: str) -> dict[str, str]:
    try:
        value = json.loads(text)
    except RecursionError:   # a prediction nested ~1000 deep: a defect, not a crash
        raise ValueError("LOCALS nested too deep to read") from None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("LOCALS is not a JSON object of strings")
    return value


def _parse_frame(piece: str) -> Frame:
    """One frame's text (without its <|frame_sep|>); raises ValueError naming the defect."""
    sep = next((s for s in KINDS if piece.startswith(s)), None)
    if sep is None:
        raise ValueError(f"frame does not start with an event token: {piece[:40]!r}")
    kind, body = KINDS[sep], piece[len(sep):]
    if kind in ("call", "line"):
        locals_text, act, source = body.partition(ACTION_SEP)
        if not act:
            raise ValueError(f"{kind} frame without {ACTION_SEP}")
        try:
            raw = _str_dict(locals_text)
        except ValueError as err:
            raise ValueError(f"{kind} frame LOCALS: {err}") from None
        value = None
    else:
        if not body.startswith(ACTION_SEP):
            raise ValueError(f"{kind} frame without {ACTION_SEP} right after its event token")
        source, arg, value_text = body[len(ACTION_SEP):].partition(ARG_SEP)
        if not arg:
            raise ValueError(f"{kind} frame without {ARG_SEP}")
        try:
            value = json.loads(value_text)
        except (ValueError, RecursionError):   # (nested too deep to read)
            value = None
        if not isinstance(value, str):
            raise ValueError(f"{kind} frame VALUE is not a JSON string: {value_text[:40]!r}")
        raw = None
    if not source.endswith("\n") or "\n" in source[:-1]:
        raise ValueError(f"{kind} frame SOURCE is not one line ending in a newline: {source[:40]!r}")
    if "<|" in source and any(t in source for t in TRACE_TOKENS):
        raise ValueError(f"{kind} frame SOURCE holds a trace token")
    return Frame(kind, source, raw, None, value)


class _Scope:
    """An open scope of the stack `parse` rebuilds."""

    __slots__ = ("locals", "source", "raised")

    def __init__(self, locals_: dict[str, str], source: str | None):
        self.locals = locals_      # its last full locals
        self.source = source       # the source of its last call/line frame (its current line)
        self.raised: str | None = None   # the last exception VALUE reported in it, if any


def parse(text: str) -> Parsed:
    """Frames of a trace text (the part after the prompt), resolved; see the module doc."""
    out = Parsed()
    body, eot, _ = text.partition(END_OF_TEXT)
    out.ended = bool(eot)
    pieces = body.split(FRAME_SEP)
    if pieces[-1]:
        out.broken = f"text after the last {FRAME_SEP}: {pieces[-1][:40]!r}"
        out.errors.append(out.broken)
    scopes = [_Scope({}, None)]
    prev_kind = None
    # the tracer's `..` reference: the scope of the previous frame and the locals a line frame
    # of that scope is written against (None after a value frame that entered it)
    ref: tuple[_Scope | None, dict[str, str] | None] = (None, None)
    raised = False   # an exception frame seen: a scope may have ended without a frame
    for i, piece in enumerate(pieces[:-1]):
        if out.left_main:
            out.broken = f"frame {i} after main was left"
            out.errors.append(out.broken)
            break
        try:
            fr = _parse_frame(piece)
        except ValueError as err:
            out.broken = f"frame {i}: {err}"
            out.errors.append(out.broken)
            break
        if len(scopes) > 1:
            if fr.kind == "exception" and _propagated(fr, prev_kind, scopes):
                scopes.pop()
            elif fr.kind in ("line", "return"):
                del scopes[_swallowed(fr, prev_kind, ref, scopes):]
            if raised and fr.kind in ("return", "exception") and \
                    fr.source == scopes[0].source != scopes[-1].source:
                del scopes[1:]   # main's exit (module doc)
        if fr.kind == "call":
            if SAME in fr.raw.values():
                out.errors.append(f"frame {i}: '..' in a call frame (always written in full)")
            fr.locals = {k: v for k, v in fr.raw.items() if v != SAME}
            scopes.append(_Scope(fr.locals, fr.source))
        elif fr.kind == "line":
            prev = scopes[-1].locals
            missing = [k for k, v in fr.raw.items() if v == SAME and k not in prev]
            if missing:
                out.errors.append(f"frame {i}: '..' for {missing[0]!r}, not a local of the "
                                  f"scope's previous frame")
            fr.locals = {k: (prev.get(k, SAME) if v == SAME else v) for k, v in fr.raw.items()}
            scopes[-1].locals, scopes[-1].source = fr.locals, fr.source
        fr.depth = len(scopes) - 1
        if fr.kind in ("call", "line"):
            ref = (scopes[-1], fr.locals)
        elif ref[0] is not scopes[-1]:
            ref = (scopes[-1], None)
        if fr.kind == "exception":
            scopes[-1].raised = fr.value
            raised = True
        if fr.kind == "return":
            scopes.pop()
        # main's body is one `return <call>` line: it cannot catch, so an exception in main
        # leaves it as a return does
        if not scopes or (fr.kind == "exception" and len(scopes) == 1):
            out.left_main = True
        out.frames.append(fr)
        prev_kind = fr.kind
    # not broken: every frame read, none after main's exit, nothing after the last
    # <|frame_sep|> but end-of-text: main's exit frame is the last thing the text says
    out.finished = out.ended and out.left_main and out.broken is None
    return out


def _propagated(fr: Frame, prev_kind: str | None, scopes: list[_Scope]) -> bool:
    """Is this exception frame the exception arriving in the caller of the current scope? Yes
    right after another exception frame (the scope did not catch it: no line ran in between),
    or when it is reported at the caller's current line and not at the scope's own (a scope
    whose last line was a non-matching `except` clause, or a `finally` that re-raised)."""
    if prev_kind == "exception":
        return True
    return fr.source != scopes[-1].source and fr.source == scopes[-2].source


def _swallowed(fr: Frame, prev_kind: str | None, ref: tuple, scopes: list[_Scope]) -> int:
    """How many scopes stay open under a line or return frame: fewer than `scopes` when the
    current scope (and any between it and the frame's, all having raised) ended without a
    frame after an exception C code swallowed (module doc)."""
    top, s = len(scopes), scopes[-1]
    if s.raised is None:   # no exception in it: it can only end with a return frame
        return top
    if fr.kind == "return":   # a return is at its scope's current line
        if fr.source == s.source:
            return top
        for j in range(top - 2, -1, -1):
            if scopes[j].source == fr.source:
                return j + 1
            if scopes[j].raised is None:
                break
        return top
    if not fr.raw or SAME in fr.raw.values():   # `..`: the previous frame's scope goes on
        return top
    # written in full: a line of this scope would have written `..` for every value equal in
    # the tracer's reference (its previous frame), and right after its own exception frame
    # nothing of it ran, so every value would be equal
    own = ref[0] is s and ref[1] is not None
    sure = own and (prev_kind == "exception"
                    or any(ref[1].get(k) == v for k, v in fr.raw.items()))
    # else only a line without some name of the scope (names leave a scope by `del` alone), or
    # one of a closed generator (it can only end), is weighed against the ancestors
    if not sure and s.locals.keys() <= fr.raw.keys() and not s.raised.startswith("GeneratorExit("):
        return top
    for j in range(top - 2, 0, -1):   # main (0) has no second line
        a = scopes[j].locals
        if a.keys() <= fr.raw.keys() and (any(fr.raw[k] == v for k, v in a.items())
                                           or (sure and not a)):
            return j + 1
        if scopes[j].raised is None:
            break
    return top


def frame_metrics(pred: Parsed, real: Parsed, real_result: str | None = None) -> dict[str, float]:
    """The per-program metrics (module doc) of a prediction against the real trace."""
    n = len(real.frames)
    action = state = 0
    keys: list[float] = []
    kv: list[float] = []
    for i, r in enumerate(real.frames):
        p = pred.frames[i] if i < len(pred.frames) else None
        same_kind = p is not None and p.kind == r.kind
        action += int(same_kind and p.source == r.source)
        state += int(same_kind and p.state == r.state)
        if r.kind in ("call", "line"):
            pl = p.locals if p is not None and p.kind in ("call", "line") else None
            if pl is None:
                keys.append(0.0)
                kv.append(0.0)
                continue
            keys.append(float(set(pl) == set(r.locals)))
            names = set(pl) | set(r.locals)
            agree = sum(1 for k in names if k in pl and pl.get(k) == r.locals.get(k))
            kv.append(agree / len(names) if names else 1.0)
    # the parser stops at main's exit and keeps a cut prediction's frames: only a valid
    # prediction says the trace ends where the real one does
    exact = pred.valid and len(pred.frames) == n and action == n and state == n
    out = {"valid_format": float(pred.valid),
           "action_exact_match": action / n if n else float(not pred.frames),
           "state_exact_match": state / n if n else float(not pred.frames),
           "key_match": sum(keys) / len(keys) if keys else 1.0,
           "key_value_match": sum(kv) / len(kv) if kv else 1.0,
           "trace_exact_match": float(exact)}
    if real_result is not None:
        out["output_from_trace"] = float(pred.returned == real_result)
    return out


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the programs that have it (macro average)."""
    names = sorted({k for r in rows for k in r})
    out = {}
    for k in names:
        vals = [r[k] for r in rows if k in r]
        out[k] = sum(vals) / len(vals) if vals else 0.0
    return out


TEACHER_METRICS = ("next_frame_exact", "next_action_exact", "next_state_exact")


def _frame_spans(text: str) -> list[tuple[list[tuple[int, int]], list[tuple[int, int]], int]]:
    """Per frame of a real trace text: the character ranges of its action and its state, and
    where it ends (after its <|frame_sep|>)."""
    out, pos = [], 0
    while (end := text.find(FRAME_SEP, pos)) >= 0:
        piece = text[pos:end]
        sep = next((s for s in KINDS if piece.startswith(s)), None)
        if sep is None:
            raise ValueError(f"frame at {pos} does not start with an event token: {piece[:40]!r}")
        if KINDS[sep] in ("call", "line"):
            a = pos + piece.index(ACTION_SEP)
            action, state = [(pos, pos + len(sep)), (a, end)], [(pos + len(sep), a)]
        else:
            g = pos + piece.index(ARG_SEP)
            action, state = [(pos, g)], [(g, end)]
        out.append((action, state, end + len(FRAME_SEP)))
        pos = end + len(FRAME_SEP)
    return out


def teacher_forced(text: str, offsets: list[tuple[int, int]], correct: list[bool]) -> dict[str, float]:
    """Next-frame metrics (module doc) of one real trace `text`, from its tokens' character
    `offsets` and whether the model's argmax was each token given the real prefix."""
    spans = _frame_spans(text)
    if not spans:
        return {}
    ok = {"frame": [True] * len(spans), "action": [True] * len(spans),
          "state": [True] * len(spans)}
    f = 0
    for (start, _), good in zip(offsets, correct):
        while f < len(spans) and start >= spans[f][2]:
            f += 1
        if f == len(spans):   # end-of-text: the stop decision, not a frame
            break
        action, state, _ = spans[f]
        ok["frame"][f] &= good
        if any(a <= start < b for a, b in action):
            ok["action"][f] &= good
        elif any(a <= start < b for a, b in state):
            ok["state"][f] &= good
    return {f"next_{k}_exact": sum(v) / len(v) for k, v in ok.items()}
