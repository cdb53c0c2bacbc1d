"""Trace frames and their CWM text rendering (BRIEF.md, "The CWM trace format").

call / line:        <|call_sep|>LOCALS<|action_sep|>SOURCE<|frame_sep|>   (line: state before it runs)
return / exception: <|return_sep|><|action_sep|>SOURCE<|arg_sep|>VALUE<|frame_sep|>

LOCALS is ``json.dumps({name: repr})`` and VALUE ``json.dumps(repr)``. We build the JSON by hand
with the encoder ``json.dumps`` itself uses for strings (same bytes, a few times faster).

The ``..`` rule (see :class:`Renderer`): in a line frame, a local whose repr equals its repr in the
previous frame is ``".."`` -- but only when that previous frame belongs to the same scope (one
activation of a code object). When any other scope emitted a frame in between (a nested call, a
comprehension, a callback from a library, an exception coming up from a callee), the next frame of
the scope repeats every local in full, as CWM's own generations do; then ``..`` resumes. Call
frames (entering or resuming a scope) are always written in full.

The recorder (``core.Recorder``) applies the same rules inline while tracing, for speed; the
tests check that :func:`render` of its frames gives back its text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json

from .reprs import safe_repr

TRACE_CONTEXT_START = "<|trace_context_start|>"
FRAME_SEP = "<|frame_sep|>"
CALL_SEP = "<|call_sep|>"
LINE_SEP = "<|line_sep|>"
RETURN_SEP = "<|return_sep|>"
EXCEPTION_SEP = "<|exception_sep|>"
ACTION_SEP = "<|action_sep|>"
ARG_SEP = "<|arg_sep|>"

# The special tokens (codeworld/tokens.py) open with "<|", "<tool" or "</tool": a value (or a
# name) whose text holds one, say '<|frame_sep|>' or '<|end_of_text|>', would be read as the
# token itself, by the parser and by the tokenizer (its special tokens match anywhere in a
# text). In the JSON of a frame's locals and values their "<" is written "\u003c": still
# JSON, read back as the same text.
def unreserved(js: str) -> str:
    """JSON text with no special token in it (see above)."""
    if "<|" not in js and "tool" not in js:   # (core._snapshot inlines this check)
        return js
    return js.replace("<|", "\\u003c|").replace("<tool", "\\u003ctool").replace(
        "</tool", "\\u003c/tool")


def _enc(text: str) -> str:
    """``text`` as a JSON string, with no token of the format in it."""
    return unreserved(_json(text))


CALL, LINE, RETURN, EXCEPTION = "call", "line", "return", "exception"
_SEP = {CALL: CALL_SEP, LINE: LINE_SEP, RETURN: RETURN_SEP, EXCEPTION: EXCEPTION_SEP}
_SAME = '"' + '..' + '"'


@dataclass(slots=True)
class Frame:
    """One trace event. ``locals`` holds full reprs (``..`` is applied only when rendering);
    it is None for return/exception frames, ``value`` is None for call/line frames."""

    kind: str  # "call" | "line" | "return" | "exception"
    scope: int  # activation id: 0 is main, then numbered in order of first entry
    line: int  # 1-based line in the context
    source: str  # that physical line, indentation and trailing newline included
    locals: dict[str, str] | None = None
    value: str | None = None


@dataclass(frozen=True, slots=True)
class TraceLimits:
    """CWM dropped traces over 10k events or 1 MB; ``max_repr`` bounds one value's repr."""

    max_events: int = 10_000  # frames recorded, main's call frame included
    max_bytes: int = 1_000_000  # UTF-8 bytes of ``text``
    max_repr: int = 200  # chars kept of one repr before "...<truncated>"


@dataclass(slots=True)
class TraceResult:
    status: str  # "ok" | "exception" | "too_long" | "invalid"
    prompt: str = ""  # <|trace_context_start|> + context + <|frame_sep|>
    text: str = ""  # frames after main's call frame through main's return/exception frame
    result: str | None = None  # repr of main's return value ("ok" only)
    error: str | None = None  # "TypeName: message", or why the trace is too_long / invalid
    events: int = 0  # len(frames), main's call frame included
    # The recorder keeps plain tuples; :attr:`frames` builds Frame objects on first use (a fork
    # server that only ships ``text`` never pays for them).
    _records: list = field(default_factory=list, repr=False, compare=False)
    _lines: list = field(default_factory=list, repr=False, compare=False)
    _frames: list | None = field(default=None, repr=False, compare=False)

    @property
    def frames(self) -> list[Frame]:
        """Structured frames, main's call frame first (``render(frames[1:]) == text``)."""
        if self._frames is None:
            lines, n = self._lines, len(self._lines)
            self._frames = [Frame(kind, scope, line, lines[line - 1] if 0 < line <= n else "\n",
                                  loc, value)
                            for kind, scope, line, loc, value in self._records]
        return self._frames


_KEYS: dict[str, str] = {}  # local name -> '"name": ' (names repeat across frames)


def name_text(key: object) -> str:
    """A key of a frame's locals that is not a str (a program can write any key into the dict
    ``locals()`` returns, which is the frame's own on 3.11, a class body's namespace on every
    version) as ``json.dumps`` writes it: int and float by their repr, ``true``/``false``/
    ``null``; any other key (json.dumps would refuse it) by its address-free repr."""
    if key is True or key is False or key is None:
        return "true" if key is True else "false" if key is False else "null"
    if type(key) is int:
        return int.__repr__(key)
    if type(key) is float:
        return ("NaN" if key != key else "Infinity" if key == float("inf")
                else "-Infinity" if key == -float("inf") else float.__repr__(key))
    return safe_repr(key)


def _key(name: str) -> str:
    if len(_KEYS) > 100_000:
        _KEYS.clear()
    key = _KEYS[name] = _json(name) + ": "   # (a name is an identifier: no "<|")
    return key


def render_locals(loc: dict[str, str], prev: dict[str, str] | None) -> str:
    """``json.dumps(loc)`` with ``".."`` for values equal to those in ``prev``."""
    if not loc:
        return "{}"
    keys = _KEYS
    if prev is None:
        return unreserved("{" + ", ".join([(keys.get(k) or _key(k)) + _json(v)
                                           for k, v in loc.items()]) + "}")
    get = prev.get
    return unreserved("{" + ", ".join([(keys.get(k) or _key(k))
                                       + (_SAME if get(k) == v else _json(v))
                                       for k, v in loc.items()]) + "}")


class Renderer:
    """Incremental frame -> text, keeping the state the ``..`` rule needs: only the locals of
    the scope that emitted the last frame can be referenced, so one snapshot is enough."""

    __slots__ = ("_scope", "_prev")

    def __init__(self) -> None:
        self._scope: int | None = None
        self._prev: dict[str, str] | None = None

    def state(self) -> tuple:
        return self._scope, self._prev

    def restore(self, state: tuple) -> None:
        self._scope, self._prev = state

    def add(self, fr: Frame) -> str:
        kind = fr.kind
        if kind == LINE:
            prev = self._prev if self._scope == fr.scope else None
            self._scope, self._prev = fr.scope, fr.locals
            return LINE_SEP + render_locals(fr.locals, prev) + ACTION_SEP + fr.source + FRAME_SEP
        if kind == CALL:
            self._scope, self._prev = fr.scope, fr.locals
            return CALL_SEP + render_locals(fr.locals, None) + ACTION_SEP + fr.source + FRAME_SEP
        if self._scope != fr.scope:
            self._scope, self._prev = fr.scope, None
        return (_SEP[kind] + ACTION_SEP + fr.source + ARG_SEP + _enc(fr.value)
                + FRAME_SEP)


def render(frames: list[Frame]) -> str:
    """CWM text of ``frames`` (pass ``result.frames[1:]`` to get ``result.text``)."""
    r = Renderer()
    return "".join([r.add(f) for f in frames])


# Structured frames leave the sandbox packed: a frame repeats every local in full, so a trace
# within max_bytes of text could need many times that as plain frames (big.py of the tracer
# audit: 963 KB of text, 7.1 MB of frames). Packed, a local whose repr is the one it had in
# the same scope's previous call/line frame is written 0 (never a repr: reprs are strings),
# so the frames take no more room than the text, where such a value is ".." or longer.
_KINDS = (CALL, LINE, RETURN, EXCEPTION)


def pack_frames(records) -> list[list]:
    """``[kind, scope, line, locals, value]`` per record ``(kind, scope, line, locals, value)``
    (:attr:`TraceResult._records`), locals packed as above (:func:`unpack_frames` undoes it)."""
    last: dict[int, dict] = {}  # scope -> its latest call/line locals
    out = []
    for kind, scope, line, loc, value in records:
        if loc is not None:
            prev = last.get(scope)
            last[scope] = loc
            if prev:
                loc = {k: 0 if prev.get(k) == v else v for k, v in loc.items()}
        out.append([kind, scope, line, loc, value])
    return out


def pack_frame_dicts(frames: list[dict] | None) -> list[list] | None:
    """:func:`pack_frames` of frames as :func:`unpack_frames` gives them: the form a trace
    record keeps them in (the full form repeats every local at every event: 7.4 MB of the
    default's 2,240 function traces, 2.9 MB packed)."""
    if frames is None:
        return None
    return pack_frames((f["kind"], f["scope"], f["line"], f["locals"], f["value"]) for f in frames)


def unpack_frames(packed: object) -> list[dict]:
    """The frames of :func:`pack_frames`' output as dicts (kind, scope, line, locals, value),
    every local in full; unchanged reprs are shared, not copied, so memory stays near the
    packed size. Raises ValueError on anything malformed (it crossed the sandbox boundary)."""
    if type(packed) is not list:
        raise ValueError("frames: not a list")
    last: dict[int, dict] = {}
    out = []
    for item in packed:
        if type(item) is not list or len(item) != 5:
            raise ValueError("frames: an entry is not [kind, scope, line, locals, value]")
        kind, scope, line, loc, value = item
        if kind not in _KINDS or type(scope) is not int or type(line) is not int or \
                not (value is None or type(value) is str):
            raise ValueError("frames: bad kind, scope, line or value")
        if loc is not None:
            loc = _unpack_locals(loc, last.get(scope, {}))
            last[scope] = loc
        out.append({"kind": kind, "scope": scope, "line": line, "locals": loc, "value": value})
    return out


def _unpack_locals(loc: object, prev: dict) -> dict[str, str]:
    if type(loc) is not dict:
        raise ValueError("frames: locals not an object")
    full = {}
    for k, v in loc.items():
        if type(v) is str:
            full[k] = v
        elif type(v) is int and v == 0 and k in prev:
            full[k] = prev[k]
        else:
            raise ValueError(f"frames: bad value for local {k!r}")
    return full


def prompt_for(context: str) -> str:
    return TRACE_CONTEXT_START + context + FRAME_SEP
