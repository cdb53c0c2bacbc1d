"""Reading JSON lines where one bad line is reported, never fatal."""

from __future__ import annotations

import json
from typing import Iterator

from codeworld.storage import filesystem


def read_jsonl(path: str, endpoint_url: str | None = None) -> Iterator[tuple[str, dict | None, str | None]]:
    """`(where, obj, problem)` for each non-blank line of a local or s3:// file: `where` is
    "PATH:LINE", `obj` the line's JSON object, or None with `problem` saying why."""
    with filesystem(path, endpoint_url).open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except (ValueError, UnicodeDecodeError) as err:
                yield where, None, f"not JSON: {err}"
                continue
            except RecursionError:  # e.g. "[[[[...": nested deeper than the parser recurses
                yield where, None, "not JSON this reader can parse: nested too deeply"
                continue
            if isinstance(obj, dict):
                yield where, obj, None
            else:
                yield where, None, f"not a JSON object ({type(obj).__name__})"
