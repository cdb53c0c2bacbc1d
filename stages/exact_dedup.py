"""Exact dedup key: sha256 of normalised content.

Normalisation: a UTF-8 byte order mark at the start is dropped (an editor's; Python ignores it
there), CRLF/CR line ends become LF, trailing whitespace of each line is dropped, and blank
lines at the start and end are dropped. Files that differ only in those ways are the same
document to a model trained on them; everything else (indentation, comments) is kept.
"""

from __future__ import annotations

import hashlib


def normalise(text: str) -> str:
    lines = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def content_key(text: str) -> bytes:
    return hashlib.sha256(normalise(text).encode("utf-8", "surrogatepass")).digest()
