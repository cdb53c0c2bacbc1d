"""Sandbox side of the agent's file tools (``edit``, ``create``). Never imported on the host:
run as ``python -I -S cwtools.py /sandbox/spec/spec.json`` with the working copy at /work (the
cwd, writable). A path is resolved inside the sandbox, so ``../x`` or ``/etc/x`` reach only the
sandbox's own read-only, empty filesystem: nothing outside the working copy can be changed.
Prints one line saying what was done, or ``error: ...`` (exit status 1).
"""
import json
import os
import sys


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    path = spec["path"]
    try:
        if spec["tool"] == "create":
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(spec["content"])
            print(f"created {path} ({spec['content'].count(chr(10))} lines)")
            return 0
        with open(path, encoding="utf-8") as f:
            text = f.read()
        search, replace = spec["search"], spec["replace"]
        count = text.count(search) if search else 0
        if count != 1:
            why = "empty SEARCH block" if not search else (
                "SEARCH text not found" if count == 0 else f"SEARCH text found {count} times (must be unique)")
            print(f"error: {path}: {why}; nothing changed")
            return 1
        at = text.index(search)
        first = text.count("\n", 0, at) + 1
        with open(path, "w", encoding="utf-8") as f:
            f.write(text[:at] + replace + text[at + len(search):])
        print(f"edited {path}: replaced lines {first}-{first + search.count(chr(10))}")
        return 0
    except (OSError, UnicodeDecodeError) as err:
        print(f"error: {path}: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
