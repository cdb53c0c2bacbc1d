"""The agent's tools, exactly CWM's: ``bash``, ``edit``, ``create``, ``submit``.

A turn holds one call, written ``<tool: NAME>\\n...\\n</tool>``:

    <tool: bash>            the command (run by bash -c, stderr merged into stdout)
    <tool: edit>            the file path, then one SEARCH/REPLACE block:
    path/to/file.py         <<<<<<< SEARCH / old text / ======= / new text / >>>>>>> REPLACE
    <tool: create>          the file path, then the whole content
    <tool: submit>          (empty): the episode ends and the reward is computed

Every tool runs in the sandbox on the episode's working copy (/work, the cwd: a copy on a
tmpfs of `workdir_mb`, written back to the host after the call): bash commands and file edits
alike, so a path or command that aims outside the working copy meets the sandbox's empty
read-only filesystem, and no call can write more than the limit. Observations are cut to a character budget
(head and tail kept). Only what really changes run after run is masked: the duration on the
summary line of pytest (and unittest) and the address in a repr (``<... at 0x...>``, ``object
at 0x...``); everything else, a source file's ``cat`` included, is shown as it is, so text
copied from an observation into an edit matches the file (an address masked in a file's own
text too: the edit tool reads ``0x?`` as any address, runner/cwtools.py).

A call ends at the first ``</tool>`` that starts a line or ends one: ``</tool>`` inside a
line of a file's content is content (the openai policy's stop sequences are these ends only:
policies.STOPS).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from codeworld.sandbox.bwrap import python_install
from codeworld.tokens import CALL_RE
from stages.agent.envs import SANDBOX_LIB, SANDBOX_SPEC, Env, sandbox

TOOLS = ("bash", "edit", "create", "submit")
# The markers are whole lines: a SEARCH text may hold "# ==========" or "x >>>>>>> y".
SEARCH, SEP, REPLACE = "<<<<<<< SEARCH", "=======", ">>>>>>> REPLACE"
EDIT_RE = re.compile(r"\A([^\n]+)\n<<<<<<< SEARCH\n(?:(.*?)\n)?=======\n(?:(.*?)\n)?"
                     r">>>>>>> REPLACE[ \t\n]*\Z", re.S)
# pytest's last line ("==== 3 passed, 1 warning in 0.12s ====", -q: "3 passed in 0.12s", with
# the subtests plugin "1 failed, 37 passed, 7 subtests passed in 0.08s") and
# unittest's "Ran 3 tests in 0.001s": the only durations a test run prints by itself
_DURATION = re.compile(r"^(=* ?(?:\d+ [a-z]+(?: [a-z]+)*(?:, \d+ [a-z]+(?: [a-z]+)*)*|no tests ran)"
                       r" in )\d+(?:\.\d+)?s"
                       r"(?: \(\d+:\d\d:\d\d\))?( =*)?$|^(Ran \d+ tests? in )\d+\.\d+s$", re.M)
_ADDRESS = re.compile(r"(<[^<>\n]* at |\bobject at )0x[0-9a-fA-F]+\b")


@dataclass(frozen=True)
class ToolCall:
    name: str
    body: str


def parse_call(text: str) -> ToolCall | str:
    """The one tool call of an assistant turn, or an error message for the agent."""
    calls = CALL_RE.findall(text or "")
    if not calls:
        return ("error: no tool call found; write exactly one call as "
                "<tool: NAME>\\n...\\n</tool> with NAME one of " + ", ".join(TOOLS))
    if len(calls) > 1:
        return f"error: {len(calls)} tool calls in one turn; write exactly one"
    name, body = calls[0]
    if name not in TOOLS:
        return f"error: unknown tool {name!r}; tools: {', '.join(TOOLS)}"
    return ToolCall(name, body)


def truncate(text: str, budget: int) -> str:
    if len(text) <= budget:
        return text
    head = budget // 3
    tail = budget - head
    return f"{text[:head]}\n[... {len(text) - budget} characters cut ...]\n{text[len(text) - tail:]}"


def _mask_duration(m: re.Match) -> str:
    if m.group(3):
        return f"{m.group(3)}0.000s"
    return f"{m.group(1)}0.00s{m.group(2) or ''}"


def normalise(text: str) -> str:
    """``text`` with the run-to-run noise of test output masked (see the module docstring)."""
    return _ADDRESS.sub(r"\g<1>0x?", _DURATION.sub(_mask_duration, text))


def parse_edit(body: str) -> tuple[str, str, str] | str:
    """(path, search, replace) of an edit call's body, or an error message for the agent."""
    lines = body.split("\n")
    for marker in (SEARCH, SEP, REPLACE):
        if (n := sum(ln == marker for ln in lines)) > 1:
            # two blocks would be read as one, writing the markers between them into the file
            return (f"error: edit takes one SEARCH/REPLACE block, found {n} lines {marker!r}; "
                    f"make one edit call per block; nothing changed")
    m = EDIT_RE.match(body)
    if not m:
        return ("error: edit needs the file path on the first line, then <<<<<<< SEARCH, the "
                "old text, =======, the new text, >>>>>>> REPLACE (each marker on its own line)")
    return m.group(1).strip(), m.group(2) or "", m.group(3) or ""


def format_edit(path: str, search: str, replace: str) -> str:
    return f"{path}\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE"


FULL_BYTES = 64 << 10   # room left under which a working copy counts as full
OUTPUT_BYTES = 1 << 20  # a bash call's captured output (stdout and stderr merged)


@dataclass(frozen=True)
class Outcome:
    """A call's observation, and whether it left the working copy at its size limit."""
    text: str
    workdir_full: bool = False


def execute(call: ToolCall, work: Path, env: Env, *, wall_seconds: float,
            memory_mb: int = 1024, workdir_mb: int = 256) -> str:
    """Run a bash/edit/create call in the sandbox on ``work``; the observation text."""
    return run_tool(call, work, env, wall_seconds=wall_seconds, memory_mb=memory_mb,
                    workdir_mb=workdir_mb).text


def run_tool(call: ToolCall, work: Path, env: Env, *, wall_seconds: float,
             memory_mb: int = 1024, workdir_mb: int = 256) -> Outcome:
    """``execute``, and whether the call left the working copy full. ``workdir_mb``: the
    copy's hard size limit (in the sandbox it is a tmpfs, written back after the call:
    codeworld.sandbox.quota)."""
    if call.name == "bash":
        res = sandbox(["bash", "-c", "exec 2>&1\n" + call.body], work, env, writable=True,
                      wall_seconds=wall_seconds, memory_mb=memory_mb, output_bytes=OUTPUT_BYTES,
                      quota_mb=workdir_mb)
        out = res.stdout
        if res.stdout_truncated:  # the end (pytest's summary...) is missing: say so
            out += (f"\n[output cut: the command wrote more than {OUTPUT_BYTES >> 20} MiB; only "
                    f"the first {OUTPUT_BYTES >> 20} MiB is kept: write less, or redirect to a "
                    f"file and read its tail]")
        if res.timed_out:
            out += f"\n[killed: the command ran over {wall_seconds:g} s]"
        if res.memory_limit_hit:
            out += "\n[killed: a process went over the sandbox's memory limit]"
        return _outcome(res, normalise(f"{out}\n[exit code {res.returncode}]"))
    if call.name == "edit":
        edit = parse_edit(call.body)
        if isinstance(edit, str):
            return Outcome(edit)
        spec = {"tool": "edit", "path": edit[0], "search": edit[1], "replace": edit[2]}
    elif call.name == "create":
        path, _, content = call.body.partition("\n")
        if not path.strip():
            return Outcome("error: create needs the file path on the first line, then the content")
        # the line break before </tool> belongs to the call's syntax, and ends the last line
        spec = {"tool": "create", "path": path.strip(),
                "content": content + "\n" if content else ""}
    else:
        raise ValueError(f"execute: {call.name} is not an executable tool")
    argv = [python_install()[0], "-I", "-S", f"{SANDBOX_LIB}/cwtools.py", f"{SANDBOX_SPEC}/spec.json"]
    res = sandbox(argv, work, env, writable=True, wall_seconds=wall_seconds,
                  memory_mb=memory_mb, spec=spec, quota_mb=workdir_mb)
    return _outcome(res, normalise((res.stdout + res.stderr[-500:]).strip()))


def _outcome(res, text: str) -> Outcome:
    if res.workdir_error:   # the copy is as it was before the call
        text += f"\n[error: the working copy was not changed: {res.workdir_error}]"
    free = res.workdir_free_bytes
    return Outcome(text, free is not None and free < FULL_BYTES)
