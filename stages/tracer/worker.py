"""Fork-server handler: one JSON request in, one trace out (runs inside the sandbox).

Request::

    {"id": ..., "code": "<program>", "call": "f([1, 2], 3)"}
    {"id": ..., "code": "<program>", "input": "[1, 2], 3", "entry": "f"}   # call = entry(input)

``entry`` defaults to ``"f"``; ``call`` wins when both forms are given. An optional ``"limits"``
object overrides :class:`TraceLimits` fields (``max_events``, ``max_bytes``, ``max_repr``).

Response::

    {"id", "trace", "result", "error", "status", "events", "prompt"[, "frames"]}

``"prompt": false`` in the request leaves ``prompt`` out (null) unless the status is "invalid":
the caller rebuilds it from ``code`` and ``call`` (``prompt_for(context_of(code, call))``), which
saves sending the whole program back.

``"too_long_text": false`` leaves a too_long trace's partial text (and frames) out.

``"frames": true`` in the request adds the structured frames, main's call frame first, packed
(:func:`.frames.pack_frames`: ``[kind, scope, line, locals, value]``, a local unchanged since
its scope's previous call/line frame written 0) so that they take no more room than the text;
:func:`.frames.unpack_frames` gives them back as dicts with every local in full.

``trace`` is :attr:`TraceResult.text` (no end-of-text token), ``status`` one of "ok",
"exception", "too_long", "invalid" (a malformed request is "invalid" too, with the reason in
``error``). Only traces with status "ok" or "exception" are training data.

This module imports the standard library and its own package only, through relative imports,
so the sandbox can bind ``stages/tracer`` alone under any top-level name: with
``code_dirs={"cwtrace": "stages/tracer"}`` the handler is ``"cwtrace.worker:handle"``.
"""

from __future__ import annotations

from .core import trace_call
from .frames import TraceLimits, pack_frames

_LIMIT_FIELDS = ("max_events", "max_bytes", "max_repr")


def request_call(request: dict) -> str:
    """The call expression of a request (raises ValueError if it has none that is a str)."""
    call = request.get("call")
    if call is None:
        entry = request.get("entry") or "f"
        args = request.get("input")
        if args is None:
            raise ValueError("request has neither 'call' nor 'input'")
        if not isinstance(entry, str) or not isinstance(args, str):
            raise ValueError("'entry' and 'input' must be strings")
        call = f"{entry}({args})"
    elif not isinstance(call, str):
        raise ValueError("'call' must be a string")
    return call


def _limits(request: dict) -> TraceLimits:
    given = request.get("limits") or {}
    if not isinstance(given, dict) or any(k not in _LIMIT_FIELDS for k in given):
        raise ValueError(f"'limits' may only set {', '.join(_LIMIT_FIELDS)}")
    values = {}
    for k, v in given.items():
        if type(v) is not int or v <= 0:
            raise ValueError(f"limits.{k} must be a positive integer")
        values[k] = v
    return TraceLimits(**values)


def handle(request: dict) -> dict:
    rid = request.get("id") if isinstance(request, dict) else None
    try:
        if not isinstance(request, dict):
            raise ValueError("request must be a JSON object")
        code = request.get("code", "")
        if not isinstance(code, str):
            raise ValueError("'code' must be a string")
        call = request_call(request)
        limits = _limits(request)
    except ValueError as exc:
        return {"id": rid, "trace": "", "result": None, "error": f"bad request: {exc}",
                "status": "invalid", "events": 0, "prompt": ""}
    r = trace_call(code, call, limits=limits)
    prompt = r.prompt if r.status == "invalid" or request.get("prompt", True) else None
    cut = r.status == "too_long" and request.get("too_long_text", True) is False
    out = {"id": rid, "trace": "" if cut else r.text, "result": r.result, "error": r.error,
           "status": r.status, "events": r.events, "prompt": prompt}
    if request.get("frames") and not cut:
        # Structured frames (main's call frame first), packed (frames.pack_frames); the source
        # line is the context's line.
        out["frames"] = pack_frames(r._records)
    return out
