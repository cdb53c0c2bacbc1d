"""The untraced reference run: a trace is kept only if tracing did not change what the program does.

The tracer reprs every local at every frame; untraced, the program never calls those reprs. A
``__repr__`` with a side effect (a counter, an append, ``next`` on an iterator it holds) made
the traced run compute what the program never computes (``p.n``: 0 untraced, 9 traced), and
the trace, status "ok", showed a run that never happens (the stage's second run is traced
too, so it agreed). So the process forks as a repr is about to run Python code for the first
time (``guard.ReprBudget.before_first``, at its first event): up to there the traced run is
the untraced one (no code of the program's has run for the tracer), and the fork goes on from
there untraced, inside the same sandbox request. The trace stands only if both runs end
alike: status, result repr, exception text, and the bytes written to fds 1 and 2 after the
fork (before it, both wrote the same). Otherwise it is invalid, its error starting
``repr_side_effect:`` (the reason the traces stage counts).

The fork waits, blocked on a pipe, until the trace is over: a trace dropped anyway (too_long,
untraceable) pays for the fork and its exit only; one whose reprs run no Python code (built-in
values, objects with object's own repr) pays nothing.

Not compared: files the program writes (the two runs share a file system), output written
through a ``sys.stdout`` that is not fd 1 (pytest's capture; in the sandbox it is fd 1), and
the untraced run's own time (one that does not end is the sandbox's timeout, as for any
program).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from .reprs import truncate

REPR_SIDE_EFFECT = "repr_side_effect"
_FDS = (1, 2)   # stdout, stderr
_SHOWN = 120    # characters of each run's outcome quoted in the error


def _flush_std() -> None:
    """Flush Python's buffers of fds 1 and 2 (the interpreter's own objects: a ``sys.stdout``
    the program put in place may run its code): buffered text is written where it was meant
    to go, and never twice (a fork inherits the buffer)."""
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):   # closed, or a broken pipe: nothing to write out
            pass


class Output:
    """What the process writes to fds 1 and 2 from now on, into a memory file each (a pipe
    would block a program writing more than its buffer: nothing reads it meanwhile).
    :meth:`stop` puts the fds back and returns what was written (``replay``: also writes it
    on to the real fds, so the program's output still goes where it went untraced)."""

    def __init__(self) -> None:
        _flush_std()
        self.files: list[tuple[int, int, int]] = []   # (fd, its saved copy, memory file)
        for fd in _FDS:
            try:
                saved = os.dup(fd)
            except OSError:   # (closed: written output fails, as it would untraced)
                continue
            mem = -1
            try:
                mem = os.memfd_create("cwtrace-output", os.MFD_CLOEXEC)
                os.dup2(mem, fd)
            except OSError:   # (no fd or memory left: the fds as they were)
                for own in (saved, mem):
                    if own >= 0:
                        os.close(own)
                self.stop(replay=False)
                raise
            self.files.append((fd, saved, mem))

    def stop(self, replay: bool) -> str:
        """Restore the fds; the sha256 of what was written (fd by fd)."""
        _flush_std()
        digest = hashlib.sha256()
        for fd, saved, mem in self.files:
            os.dup2(saved, fd)
            os.close(saved)
            os.lseek(mem, 0, os.SEEK_SET)
            digest.update(b"%d:" % fd)
            while chunk := os.read(mem, 1 << 20):
                digest.update(chunk)
                if replay:
                    _write_all(fd, chunk)
            os.close(mem)
        self.files = []
        return digest.hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:   # (the reader went away: the output is lost, as it would be untraced)
        pass


class Reference:
    """One trace's untraced reference run. :meth:`fork` forks the process; the fork waits
    until the trace is over: :meth:`outcome` lets it go on and returns how it ended,
    :meth:`close` ends it unused. In the fork, :meth:`fork` returns True (the caller stops
    recording and lets the program go on) and :meth:`report` ends the process."""

    def __init__(self) -> None:
        self.pid = 0   # the fork's, in the tracing process
        self.in_fork = False
        self.failed: str | None = None   # why there is no fork
        self.go = self.answer = -1
        self.output: Output | None = None

    def fork(self) -> bool:
        """Fork here; True in the fork, once the trace is over and it is to go on."""
        if not hasattr(os, "fork") or not hasattr(os, "memfd_create"):
            self.failed = "this platform has no fork or memfd_create"
            return False
        _flush_std()   # (the fork would write what is buffered again)
        fds: list[int] = []
        try:
            fds += os.pipe()
            fds += os.pipe()
            pid = os.fork()
        except OSError as exc:   # (no process left to the program: RLIMIT_NPROC)
            for fd in fds:
                os.close(fd)
            self.failed = f"fork failed: {exc}"
            return False
        go_r, go_w, answer_r, answer_w = fds
        if pid == 0:
            self.in_fork = True
            try:
                os.close(go_w)
                os.close(answer_r)
                if not os.read(go_r, 1):   # (closed: not needed)
                    os._exit(0)
                os.close(go_r)
                self.answer = answer_w
                self.output = Output()
            except BaseException:   # (it goes back into the caller's code only to go on)
                os._exit(1)
            return True
        os.close(go_r)
        os.close(answer_w)
        self.pid, self.go, self.answer = pid, go_w, answer_r
        try:
            self.output = Output()
        except OSError as exc:   # (the fork would have nothing to compare with)
            self.close()
            self.failed = f"output not captured: {exc}"
        return False

    def report(self, ending: tuple | None) -> None:
        """(In the fork, once the program has ended) send ``ending`` (status, result, error;
        None: it did not end) with the digest of its output, and end the process."""
        code = 1
        try:
            if ending is not None:
                digest = self.output.stop(replay=False)
                _write_all(self.answer, json.dumps([*ending, digest]).encode())
                code = 0
        finally:
            os._exit(code)

    def written(self) -> str | None:
        """(In the tracing process) the digest of what it wrote since the fork, written on
        where it was going too; None without a fork."""
        output, self.output = self.output, None
        return output.stop(replay=True) if output is not None else None

    def verdict(self, traced: list) -> str | None:
        """The error of a trace whose run (``[status, result, error, output digest]``) is not
        the untraced one, None when they agree."""
        if self.failed is not None:
            return f"untraceable: no untraced run to compare with ({self.failed})"
        return differs(traced, self.outcome())

    def outcome(self) -> list | None:
        """The untraced run's ``[status, result, error, output digest]``; None if it ended
        without one (killed, or it could not be written)."""
        try:
            os.write(self.go, b"g")
        except OSError:   # (it is gone already: killed)
            pass
        chunks = []
        while chunk := os.read(self.answer, 1 << 16):
            chunks.append(chunk)
        self.close()
        try:
            ending = json.loads(b"".join(chunks))
        except ValueError:
            return None
        return ending if isinstance(ending, list) and len(ending) == 4 else None

    def close(self) -> None:
        """End the fork unused (or reap it)."""
        if self.pid:
            os.close(self.go)
            os.close(self.answer)
            os.waitpid(self.pid, 0)
            self.pid = 0

def differs(traced: list, untraced: list | None) -> str | None:
    """The error of a trace whose run (``[status, result, error, output digest]``) is not the
    untraced one, None when they agree."""
    if untraced == traced:
        return None
    if untraced is None:
        return f"{REPR_SIDE_EFFECT}: the untraced run ended without an outcome"
    if untraced[:3] == traced[:3]:
        return (f"{REPR_SIDE_EFFECT}: the tracer's reprs changed what the program writes to "
                f"stdout or stderr (untraced and traced: {_ending(traced)})")
    return (f"{REPR_SIDE_EFFECT}: the tracer's reprs changed what the program does "
            f"(untraced: {_ending(untraced)}; traced: {_ending(traced)})")


def _ending(run: list) -> str:
    status, result, error, _ = run
    return truncate(f"result {result}" if status == "ok" else f"exception {error}", _SHOWN)
