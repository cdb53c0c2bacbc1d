"""Sandbox side of the agent's file tools (``edit``, ``create``). Never imported on the host:
run as ``python -I -S cwtools.py /sandbox/spec/spec.json`` with the working copy at /work (the
cwd, writable). A path is resolved inside the sandbox, so ``../x`` or ``/etc/x`` reach only the
sandbox's own read-only, empty filesystem: nothing outside the working copy can be changed.
A path that resolves outside /work (``/tmp/x``, a link out) is refused: the sandbox's /tmp is
writable but gone after the call.
Prints one line saying what was done, or ``error: ...`` (exit status 1).

Files are read and written with ``newline=""``: line endings stay as they are (a CRLF file
is not turned into LF by an edit elsewhere in it). A SEARCH block written with LF line ends
(as an agent writes the lines it read: a model's text, the scripted policy's split lines) that
is not in a CRLF file as it is, is looked for with CRLF ends, and its replacement written so.
Observations show an address as ``0x?`` (tools.normalise), also where a file's own text holds
one: a SEARCH text copied from them matches with each ``0x?`` standing for an address.
"""
import json
import os
import re
import sys

ADDRESS_MASK = "0x?"  # how tools.normalise shows an address (host code: not importable here)


def occurrences(text, search):
    """How many times ``search`` starts in ``text``, overlapping ones included: "aa" is in
    "aaa" twice, so it is no unique SEARCH text there (str.count would say once)."""
    n, at = 0, text.find(search)
    while at != -1:
        n += 1
        at = text.find(search, at + 1)
    return n


def crlf(text):
    """``text`` with every line end a CRLF."""
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


def unmask(text, search, replace):
    """(search, replace, count) for a SEARCH text holding masked addresses: each mask stands
    for any hex address of ``text``. At the one place that matches, ``search`` becomes the
    file's text there, and the masks of ``replace`` take the addresses found, in order (an
    address the agent copied along stays the file's)."""
    parts = search.split(ADDRESS_MASK)
    found = list(re.finditer("(0x[0-9a-fA-F]+)".join(map(re.escape, parts)), text))
    if len(found) != 1:
        return search, replace, len(found)
    addresses = iter(found[0].groups())
    new = re.sub(re.escape(ADDRESS_MASK), lambda m: next(addresses, ADDRESS_MASK), replace)
    return found[0].group(0), new, 1


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    path = spec["path"]
    work = os.getcwd()
    if os.path.commonpath([os.path.realpath(path), work]) != work:
        # the sandbox's /tmp is writable but gone after the call: "created" would mislead
        print(f"error: {path}: outside the working copy ({work}): only files under it are "
              f"kept between calls; nothing changed")
        return 1
    try:
        if spec["tool"] == "create":
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(spec["content"])
            lines = len(spec["content"].splitlines())
            print(f"created {path} ({lines} line{'' if lines == 1 else 's'})")
            return 0
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        search, replace = spec["search"], spec["replace"]
        count = occurrences(text, search) if search else 0
        if count == 0 and search and "\r\n" in text and crlf(search) != search:
            search, replace = crlf(search), crlf(replace)
            count = occurrences(text, search)
        if count == 0 and ADDRESS_MASK in search:
            search, replace, count = unmask(text, search, replace)
        if count != 1:
            why = "empty SEARCH block" if not search else (
                "SEARCH text not found" if count == 0 else f"SEARCH text found {count} times (must be unique)")
            print(f"error: {path}: {why}; nothing changed")
            return 1
        at = text.index(search)
        first = text.count("\n", 0, at) + 1
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text[:at] + replace + text[at + len(search):])
        # a SEARCH text that ends with a line end ends on that line, not on the next
        last = first + (search[:-1] if search.endswith("\n") else search).count("\n")
        print(f"edited {path}: replaced lines {first}-{last}")
        return 0
    except (OSError, UnicodeDecodeError) as err:
        print(f"error: {path}: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
