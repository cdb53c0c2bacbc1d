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
(head and tail kept), and the durations pytest prints and memory addresses are masked, so the
same actions give the same observations run after run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from codeworld.sandbox.bwrap import python_install
from stages.agent.envs import SANDBOX_LIB, SANDBOX_SPEC, Env, sandbox

TOOLS = ("bash", "edit", "create", "submit")
CALL_RE = re.compile(r"<tool: *([A-Za-z_]+)>\n?(.*?)\n?</tool>", re.S)
EDIT_RE = re.compile(r"\A([^\n]+)\n<<<<<<< SEARCH\n(.*?)\n?=======\n(.*?)\n?>>>>>>> REPLACE\s*\Z", re.S)
_DURATION = re.compile(r"\b(in )\d+(\.\d+)?s\b")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")


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
    return f"{text[:head]}\n[... {len(text) - budget} characters cut ...]\n{text[-tail:]}"


def normalise(text: str) -> str:
    return _ADDRESS.sub("0x?", _DURATION.sub(r"\g<1>0.00s", text))


def format_edit(path: str, search: str, replace: str) -> str:
    return f"{path}\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE"


FULL_BYTES = 64 << 10   # room left under which a working copy counts as full


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
                      wall_seconds=wall_seconds, memory_mb=memory_mb, output_bytes=1 << 20,
                      quota_mb=workdir_mb)
        out = res.stdout
        if res.timed_out:
            out += f"\n[killed: the command ran over {wall_seconds:g} s]"
        if res.memory_limit_hit:
            out += "\n[killed: a process went over the sandbox's memory limit]"
        return _outcome(res, normalise(f"{out}\n[exit code {res.returncode}]"))
    if call.name == "edit":
        m = EDIT_RE.match(call.body)
        if not m:
            return Outcome("error: edit needs the file path on the first line, then <<<<<<< "
                           "SEARCH, the old text, =======, the new text, >>>>>>> REPLACE")
        spec = {"tool": "edit", "path": m.group(1).strip(), "search": m.group(2),
                "replace": m.group(3)}
    elif call.name == "create":
        path, _, content = call.body.partition("\n")
        if not path.strip():
            return Outcome("error: create needs the file path on the first line, then the content")
        spec = {"tool": "create", "path": path.strip(), "content": content}
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
