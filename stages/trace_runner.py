"""Tracing programs in the sandbox: requests in, CWM trace records out, in input order.

The tracer package (stages/tracer) is bound read-only into the sandbox as `cwtrace`, and a fork
server per worker runs `cwtrace.worker:handle` on each request, so a program pays a fork, not an
interpreter start. Every program is untrusted: it runs only there.
"""

from __future__ import annotations

import compileall
import functools
import os
import sysconfig
from pathlib import Path

from codeworld.config import TraceLimitsConfig
from codeworld.sandbox import Limits, SandboxResult, map_requests
from codeworld.tokens import reserved_token
from stages.tracer.frames import prompt_for, unpack_frames
from stages.tracer.program import InvalidProgram, context_of
from stages.tracer.worker import request_call as worker_call

TRACER_DIR = Path(__file__).resolve().parent / "tracer"
HANDLER = "cwtrace.worker:handle"
STATUSES = ("ok", "exception", "timeout", "killed", "too_long", "invalid")
# The interpreter's site-packages may hold setuptools, whose .pth hook makes ``import distutils``
# load setuptools' own copy: about a second of imports (300 modules) in every forked child whose
# program imports distutils, against a per-program wall limit of 0.5 s -- such traces then timed
# out or not with the machine's load, and the stage's double run dropped them at random. The
# standard library's distutils (what the corpus's stdlib code was written against) imports in
# milliseconds. (Python 3.12+ has none: there setuptools' copy stays the only one.)
_STDLIB_DISTUTILS = (Path(sysconfig.get_paths()["stdlib"]) / "distutils").is_dir()
SANDBOX_ENV = {"SETUPTOOLS_USE_DISTUTILS": "stdlib"} if _STDLIB_DISTUTILS else {}


# Room in a response for one packed frame's kind, scope, line and brackets
# (["exception", 12345, 12345, null, ...], ) beyond what its text already pays for.
FRAME_OVERHEAD = 64


def sandbox_limits(cfg: TraceLimitsConfig, frames: bool = False) -> Limits:
    """The sandbox's limits for tracing. The response cap leaves the text (at most max_bytes,
    JSON-escaped) four times its size; requested frames get as much again as the text itself
    plus ``FRAME_OVERHEAD`` a frame: packed (frames.pack_frames), a frame's locals take no more
    room than in the text, so a trace within its text limits always fits."""
    cap = max(4 * cfg.max_bytes, 1 << 20)
    if frames:
        cap += cfg.max_bytes + FRAME_OVERHEAD * cfg.max_events
    return Limits(wall_seconds=cfg.wall_seconds, cpu_seconds=cfg.cpu_seconds,
                  memory_bytes=cfg.memory_mb << 20, max_processes=8, response_bytes=cap)


def _failure(req: dict, status: str, error: str) -> dict:
    return {"id": req.get("id"), "trace": None, "result": None, "error": error, "status": status,
            "events": 0, "prompt": None, "frames": None}


_TEXT_FIELDS = ("trace", "result", "error", "prompt")


def _malformed(out: dict, req: dict) -> str | None:
    """What makes a tracer response no trace record (the worker's fields, tracer/worker.py),
    None when nothing does: the stage reads these fields as the types they must have."""
    if out.get("id") != req.get("id"):
        return f"is for id {out.get('id')!r}"
    if out.get("status") not in STATUSES:
        return f"has status {out.get('status')!r}"
    for name in _TEXT_FIELDS:
        if out.get(name) is not None and not isinstance(out[name], str):
            return f"has a {type(out[name]).__name__} {name}"
    if type(out.get("events")) is not int:
        return f"has events {out.get('events')!r}"
    return None


def interpret(req: dict, res: SandboxResult) -> dict:
    """One sandbox result as a trace record (status ok / exception / timeout / killed /
    too_long / invalid)."""
    if res.status == "ok" and isinstance(res.response, dict):
        out = dict(res.response)
        problem = _malformed(out, req)
        if problem:   # (the program ran in the process that wrote it: it may have forged it)
            return _failure(req, "invalid", f"Invalid: the sandbox's response {problem}")
        if out.get("frames") is not None:
            try:
                out["frames"] = unpack_frames(out["frames"])
            except ValueError as exc:  # (the program ran in the same process as the packer)
                return _failure(req, "invalid", f"Invalid: {exc}")
        out.setdefault("frames", None)
        if out.get("prompt") is None and out.get("status") != "invalid":
            # left out by the sandbox (see payloads below): the same text, built here
            try:
                out["prompt"] = prompt_for(context_of(req["code"], worker_call(req)))
            except (InvalidProgram, ValueError):  # (cannot be, for a program that ran)
                out["prompt"] = ""
        return out
    if res.status == "timeout":
        return _failure(req, "timeout", "Timeout: wall-clock limit exceeded")
    if res.status == "too_large":
        return _failure(req, "too_long", "TooLong: trace response over the size cap")
    err = res.error or {}
    what = f"{err.get('type', 'Killed')}: {err.get('message', '')}".rstrip(": ")
    if res.status == "killed" and res.signal:
        what = f"Killed: signal {res.signal}" + (f" ({what})" if err else "")
    return _failure(req, "killed", what)


@functools.cache
def _compile_tracer() -> None:
    """Bytecode for the tracer package, which each sandbox server imports read-only: without
    it (PYTHONDONTWRITEBYTECODE, or a stale cache) every server start compiles it, ~30 ms."""
    compileall.compile_dir(str(TRACER_DIR), quiet=2, workers=1)


def trace_requests(requests: list[dict], limits: TraceLimitsConfig, workers: int = 0,
                   batch_size: int = 256, frames: bool = False,
                   too_long_text: bool = True, isolation: str = "process") -> list[dict]:
    """Trace each request ({"id", "code", "call"} or {"id", "code", "input", "entry"}) in the
    sandbox; one record per request, in order. Malformed requests become status "invalid".
    ``too_long_text=False``: a too_long record comes back without its partial trace (up to
    max_bytes each, for a record the traces stage drops anyway). ``isolation``: the
    programs of a batch each in a process of their own, or ``"shared"`` (traces.isolation)."""
    todo, out = [], [None] * len(requests)
    for i, req in enumerate(requests):
        if not isinstance(req, dict) or not isinstance(req.get("code"), str) or not (
                isinstance(req.get("call"), str) or isinstance(req.get("input"), str)):
            out[i] = _failure(req if isinstance(req, dict) else {}, "invalid",
                              "Invalid: needs string fields 'code' and 'call' (or 'input')")
        elif reserved := _reserved_token(req):
            # its source lines would hold the token as text: the trace's own markup to the
            # parser, the special token itself to the tokenizer
            out[i] = _failure(req, "invalid", f"Invalid: the program holds {reserved}, a token "
                                              f"of the trace format")
        else:
            todo.append(i)
    results = sandbox_results([requests[i] for i in todo], limits, workers, batch_size, frames,
                              too_long_text, isolation)
    for i, res in zip(todo, results):
        out[i] = interpret(requests[i], res)
    return out  # type: ignore[return-value]


def _reserved_token(req: dict) -> str | None:
    """The first token of the format (codeworld.tokens.SPECIAL_TOKENS) that the request's
    code, call or input holds, else None."""
    return reserved_token("\0".join(req.get(k) or "" for k in ("code", "call", "input")))


def sandbox_results(requests: list[dict], limits: TraceLimitsConfig, workers: int = 0,
                    batch_size: int = 256, frames: bool = False,
                    too_long_text: bool = True, isolation: str = "process") -> list[SandboxResult]:
    """The sandbox's raw result for each well-formed request, in order (with ``batch_size=1``
    its ``wall_seconds`` is that program's own: bench/trace_margin.py)."""
    bounds = {"max_events": limits.max_events, "max_bytes": limits.max_bytes}
    _compile_tracer()
    # "prompt": False -- the program's text is the bulk of a prompt: not sent back, rebuilt here
    payloads = [{**req, "limits": bounds, "frames": frames, "prompt": False,
                 "too_long_text": too_long_text} for req in requests]
    return map_requests(payloads, HANDLER, workers=workers or os.cpu_count() or 1,
                        batch_size=batch_size, code_dirs={"/sandbox/lib/cwtrace": TRACER_DIR},
                        limits=sandbox_limits(limits, frames), env=SANDBOX_ENV,
                        share_batch=_shared(isolation))


def _shared(isolation: str) -> bool:
    if isolation not in ("process", "shared"):
        raise ValueError(f"isolation {isolation!r}: expected 'process' or 'shared'")
    return isolation == "shared"
