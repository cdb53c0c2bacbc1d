r"""CWM-format execution tracer (BRIEF.md, "The CWM trace format").

    >>> r = trace_call("def f(x):\n    return x + 1\n", "f(1)")
    >>> r.status, r.result
    ('ok', '2')

``r.prompt`` is ``<|trace_context_start|>`` + context + ``<|frame_sep|>``, ``r.text`` the frames
from main's first line through main's return (or exception) frame; the caller appends the
end-of-text token. ``r.frames`` holds the same frames as data, main's call frame first.
``worker.handle`` wraps :func:`trace_call` for the sandbox's fork server.

The package uses relative imports only and needs nothing outside the standard library, so it
can be imported on its own under another top-level name (the sandbox binds it as ``cwtrace``).
"""

from .core import HAS_MONITORING, trace_call
from .frames import Frame, Renderer, TraceLimits, TraceResult, render
from .reprs import safe_repr

__all__ = ["HAS_MONITORING", "Frame", "Renderer", "TraceLimits", "TraceResult", "render",
           "safe_repr", "trace_call"]
