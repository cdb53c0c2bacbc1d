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
    """The lines of sandboxed code's output (bytes) that may hold a JSON object, read lazily.

    Only a line that starts with ``{`` is ever decoded and parsed: iterating yields, in order,
    the value of each such line (``json_or_none``; None also for a line over
    ``max_line_bytes``, which is not even decoded), and nothing else is built per line, so
    output of many short lines (``b"\\xff\\n" * 32M``) costs neither a str per line nor a
    parse. ``lines``: how many lines the output holds in all (as ``splitlines`` on
    ``\\n``), the basis for counting the lines a reader did not take. ``cut``: the output was
    truncated at its cap, so the text after its last line break (a line cut short) is no
    line."""

    def __init__(self, data: bytes | bytearray, *, cut: bool = False,
                 max_line_bytes: int | None = None):
        self.data, self.max_line_bytes = data, max_line_bytes
        last_nl = data.rfind(b"\n")
        self.end = last_nl + 1 if cut else len(data)
        self.lines = data.count(b"\n", 0, self.end) + (self.end > last_nl + 1)

    def spans(self):
        """(start, end) of each line that starts with ``{``, its line break excluded."""
        data, end = self.data, self.end
        pos = 0 if data[:1] == b"{" else data.find(b"\n{", 0, end) + 1
        if pos == 0 and data[:1] != b"{":
            return
        while pos < end:
            nl = data.find(b"\n", pos, end)
            if nl < 0:
                yield pos, end
                return
            yield pos, nl
            pos = data.find(b"\n{", nl, end) + 1
            if pos == 0:
                return

    def value(self, start: int, stop: int) -> object:
        if self.max_line_bytes is not None and stop - start > self.max_line_bytes:
            return None
        return json_or_none(self.data[start:stop].decode("utf-8", "replace"))

    def __iter__(self):
        for start, stop in self.spans():
            yield self.value(start, stop)

    def last(self) -> object:
        """The value of the output's last line when it starts with ``{`` (else None)."""
        stop = self.end - 1 if self.data[self.end - 1:self.end] == b"\n" else self.end
        start = self.data.rfind(b"\n", 0, max(stop, 0)) + 1
        if start >= stop or self.data[start:start + 1] != b"{":
            return None
        return self.value(start, stop)
