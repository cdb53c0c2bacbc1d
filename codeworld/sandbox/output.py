"""Reading what sandboxed code printed: it is untrusted like the code itself."""
from __future__ import annotations

import json


def json_or_none(line: str | bytes) -> object:
    """The JSON value of one output line of sandboxed code, or None when it holds none. Any
    malformed line is None, also one nested deeper than the parser recurses ('[' * 200000
    raises RecursionError, not ValueError: uncaught, one program stopped the whole stage
    reading it)."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


class JsonLines:
    """The lines of sandboxed code's output (bytes) that may hold a record, read lazily.

    A line may hold a record when it starts with one of ``starts``: by default ``{``, or the
    exact text a runner's ``json.dumps`` begins each of its records with (``{"test": ``), so
    that a line of other text, even one that starts with "{", is never decoded or parsed, nor
    even visited one by one: the next such line is found by a search of the bytes. Iterating
    yields, in order, the value of each such line (``json_or_none``; None also for a line over
    ``max_line_bytes``, which is not even decoded); ``read`` stops after a budget of them.
    ``lines``: how many lines the output holds in all (as ``splitlines`` on ``\\n``), the
    basis for counting the lines a reader did not take. ``cut``: the output was truncated at
    its cap, so the text after its last line break (a line cut short) is no line."""

    def __init__(self, data: bytes | bytearray, *, cut: bool = False,
                 max_line_bytes: int | None = None, starts: tuple[bytes, ...] = (b"{",)):
        if not starts or not all(starts):
            raise ValueError(f"JsonLines: starts must be non-empty prefixes, got {starts!r}")
        self.data, self.max_line_bytes, self.starts = data, max_line_bytes, tuple(starts)
        last_nl = data.rfind(b"\n")
        self.end = last_nl + 1 if cut else len(data)
        self.lines = data.count(b"\n", 0, self.end) + (self.end > last_nl + 1)

    def _after(self, prefix: bytes, nl: int) -> int | None:
        """Start of the first line after the line break at ``nl`` (-1: from the output's
        start) that begins with ``prefix``; None when there is none."""
        if nl < 0 and self.data.startswith(prefix) and len(prefix) <= self.end:
            return 0
        i = self.data.find(b"\n" + prefix, max(nl, 0), self.end)
        return None if i < 0 else i + 1

    def spans(self):
        """(start, end) of each line that starts with one of ``starts``, its line break
        excluded."""
        data, end = self.data, self.end
        heads = {p: self._after(p, -1) for p in self.starts}
        while True:
            live = [h for h in heads.values() if h is not None]
            if not live:
                return
            start = min(live)
            stop = data.find(b"\n", start, end)
            if stop < 0:
                yield start, end
                return
            yield start, stop
            for p, head in heads.items():   # (only those at this line search again)
                if head is not None and head <= stop:
                    heads[p] = self._after(p, stop)

    def value(self, start: int, stop: int) -> object:
        if self.max_line_bytes is not None and stop - start > self.max_line_bytes:
            return None
        return json_or_none(self.data[start:stop].decode("utf-8", "replace"))

    def __iter__(self):
        for start, stop in self.spans():
            yield self.value(start, stop)

    def read(self, budget: int, last_starts: tuple[bytes, ...] = ()):
        """The values of the first ``budget`` lines that may hold a record; past them only the
        output's last line, when it starts with one of ``last_starts`` (what a runner writes
        last: its summary). At most ``budget`` + 1 lines are parsed, whatever the output."""
        for i, (start, stop) in enumerate(self.spans()):
            if i == budget:
                if last_starts:
                    yield self.last(last_starts)
                return
            yield self.value(start, stop)

    def last(self, starts: tuple[bytes, ...] | None = None) -> object:
        """The value of the output's last line when it starts with one of ``starts`` (by
        default the lines', else None)."""
        stop = self.end - 1 if self.data[self.end - 1:self.end] == b"\n" else self.end
        start = self.data.rfind(b"\n", 0, max(stop, 0)) + 1
        if start >= stop or not any(self.data.startswith(p, start, stop)
                                    for p in (starts or self.starts)):
            return None
        return self.value(start, stop)
