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
