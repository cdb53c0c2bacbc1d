"""Exact dedup key: sha256 of normalised content.

Normalisation: a UTF-8 byte order mark at the start is dropped (an editor's; Python ignores it
there), CRLF/CR line ends become LF, trailing whitespace of each line is dropped, and blank
lines at the start and end are dropped. Files that differ only in those ways are the same
document to a model trained on them; everything else (indentation, comments) is kept.

Trailing whitespace inside a Python string literal is the string's value, not layout: two files
whose triple-quoted strings differ only there are different programs (a test's expected output,
a here-document), so in Python files it is kept (the tokenizer says where strings are). A Python
file that does not tokenize, and a file of another language (no tokenizer here), takes the plain
rule; each is counted (`RULES`). Only a file holding both trailing whitespace and a triple quote
can have a line end inside a string, so only those are tokenized (the rest is as fast as before).
"""

from __future__ import annotations

import hashlib
import io
import sys
import tokenize

# How a file was normalised, as counted in the dedup report: "python", strings kept (or nothing
# inside a string to keep); "untokenizable", a Python file the tokenizer refused, whose
# trailing whitespace was dropped everywhere; "plain", a file of another language, likewise.
RULES = ("python", "untokenizable", "plain")


# Whose tokenizer says where strings are: its rules change between Python versions (3.12's is
# the compiler's own), so a dedup output names it in its fingerprint.
TOKENIZER = f"python{sys.version_info[0]}.{sys.version_info[1]}"


def _lines(text: str) -> list[str]:
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _ends_in_strings(lines: list[str]) -> set[int] | None:
    """Indexes of the lines whose end lies inside a string literal (a multi-line one: a token
    from line a to line b holds the ends of lines a..b-1); None when the text does not
    tokenize. FSTRING_MIDDLE: an f-string's literal part on Python >= 3.12 (a STRING before)."""
    string_types = {tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    inside: set[int] = set()
    readline = io.StringIO("\n".join(lines)).readline
    try:
        for tok in tokenize.generate_tokens(readline):
            if tok.type in string_types and tok.end[0] > tok.start[0]:
                inside.update(range(tok.start[0] - 1, tok.end[0] - 1))   # rows are 1-based
    except (tokenize.TokenError, SyntaxError):   # IndentationError is a SyntaxError
        return None
    return inside


def normalise_as(text: str, language: str | None = "python") -> tuple[str, str]:
    """The normalised text and the rule (RULES) that made it."""
    lines = _lines(text)
    rule = "python" if language == "python" else "plain"
    inside: set[int] = set()
    if rule == "python" and ('"""' in text or "'''" in text) and any(
            line != line.rstrip() for line in lines):
        found = _ends_in_strings(lines)
        if found is None:
            rule = "untokenizable"
        else:
            inside = found
    # A string ends with its quote, so blank lines at the start and end are never inside one.
    return "\n".join(line if i in inside else line.rstrip()
                     for i, line in enumerate(lines)).strip("\n"), rule


def normalise(text: str, language: str | None = "python") -> str:
    return normalise_as(text, language)[0]


def content_key_as(text: str, language: str | None = "python") -> tuple[bytes, str]:
    """sha256 of the normalised text, and the rule (RULES) that normalised it."""
    norm, rule = normalise_as(text, language)
    return hashlib.sha256(norm.encode("utf-8", "surrogatepass")).digest(), rule


def content_key(text: str, language: str | None = "python") -> bytes:
    return content_key_as(text, language)[0]
