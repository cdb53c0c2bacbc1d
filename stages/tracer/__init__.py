r"""CWM-format execution tracer (BRIEF.md, "The CWM trace format").

    >>> r = trace_call("def f(x):\n    return x + 1\n", "f(1)")
    >>> r.status, r.result
    ('ok', '2')

``r.prompt`` is ``<|trace_context_start|>`` + context + ``<|frame_sep|>``, ``r.text`` the frames
from main's first line through main's return (or exception) frame; the caller appends the
end-of-text token. ``r.frames`` holds the same frames as data, main's call frame first.
``worker.handle`` wraps :func:`trace_call` for the sandbox's fork server.

For tracers with hooks of their own (the repository tracer, ``stages/tracer_repo``): a
:class:`Recorder` fed with frame events gives the same frames, ``..`` rule, reprs and limits;
:func:`code_info` describes a code object to it, :class:`TraceStop` is what it raises at a
limit, and ``RETURN_OPS`` / ``YIELD_OPS`` / ``SEND_OPS`` classify ``sys.settrace``'s "return"
and "exception" events by the instruction at ``frame.f_lasti`` (``TOO_DEEP``: the reason given
for a RecursionError while tracing).

The package uses relative imports only and needs nothing outside the standard library, so it
can be imported on its own under another top-level name (the sandbox binds it as ``cwtrace``).
"""

from .core import (HAS_MONITORING, RETURN_OPS, SEND_OPS, TOO_DEEP, YIELD_OPS, Recorder,
                   TraceStop, trace_call)
from .frames import Frame, Renderer, TraceLimits, TraceResult, render
from .program import CodeInfo, code_info
from .reprs import error_text, safe_repr

__all__ = ["HAS_MONITORING", "RETURN_OPS", "SEND_OPS", "TOO_DEEP", "YIELD_OPS", "CodeInfo", "Frame",
           "Recorder", "Renderer", "TraceLimits", "TraceResult", "TraceStop", "code_info",
           "error_text", "render", "safe_repr", "trace_call"]
