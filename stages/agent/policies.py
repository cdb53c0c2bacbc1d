"""Policies: what writes the agent's turns. One interface, ``act(messages) -> str`` (an
assistant turn holding one tool call), behind ``make_policy(name, cfg)``.

* ``scripted`` (offline default): a real debugging strategy, written as a coroutine that reads
  only its observations and the problem statement, never the gold patch or the mutation:
  reproduce (run the suite), read the failing tests and a traceback, localise (the package
  frames of the traceback, else the functions the failing test line calls, found with grep),
  view each suspect function, then try candidate fixes at its lines (the inverse rewrite rules
  of ``stages.agent.mutate.candidate_fixes``, lines named by the traceback first): edit, rerun
  the failing tests, keep the edit if they pass and the whole suite passes, else revert it.
  It submits when the suite passes or its turns run out.
* ``openai``: any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp, ...) at
  ``agent.openai.base_url`` with ``agent.openai.model``; the key, if any, from the
  environment variable named by ``api_key_env``.
* ``megatron`` (``ModelPolicy``): the model under RL training writes the turns (phase ``rl``,
  model/rl.py builds it around its own sampler; not an agent-stage policy, which runs before
  any model exists).
"""
from __future__ import annotations

import builtins
import json
import keyword
import os
import re
import shlex
import time
import urllib.error
import urllib.request
from typing import Generator

from stages.agent.mutate import candidate_fixes
from stages.agent.tools import CALL_RE, format_edit

SYSTEM_PROMPT = """You are a software engineer fixing a bug in a Python repository (the current \
directory). Use one tool per turn, written exactly as
<tool: NAME>
...
</tool>
Tools:
- bash: a shell command (one line or a script); you see its output.
- edit: the file path on the first line, then one block
<<<<<<< SEARCH
exact old text
=======
new text
>>>>>>> REPLACE
- create: the file path on the first line, then the whole file content.
- submit: (empty body) when the tests pass; your changes are then evaluated.
"""


# A call ends at a `</tool>` that starts or ends a line (tools.CALL_RE): the openai policy's
# server stops there, not at one inside a line of a file's content.
STOPS = ["\n</tool>", "</tool>\n"]


def call(name: str, body: str = "") -> str:
    return f"<tool: {name}>\n{body}\n</tool>" if body else f"<tool: {name}>\n</tool>"


_FAILED = re.compile(r"^(?:FAILED|ERROR|SUBFAILED\S*) (\S+?\.py::\S+)", re.M)
_LISTED = re.compile(r"^- (\S+?\.py::.+)$", re.M)  # node ids may hold spaces
_FRAME = re.compile(r"^(\S+\.py):(\d+): in (\w+)", re.M)
_NUMBERED = re.compile(r"^\s*(\d+)\t(.*)$")
_TESTY = re.compile(r"(^|/)(tests?/|test_[^/]*\.py$|[^/]*_test\.py$|conftest\.py$)")


def _called_names(line: str) -> list[str]:
    names = re.findall(r"([A-Za-z_]\w*)\s*\(", line.split("#")[0])
    skip = {"self", "pytest", "raises", "warns", "catch_warnings", "simplefilter", "approx"}
    return [n for n in names if n not in skip and not n.startswith("assert")
            and not keyword.iskeyword(n) and not hasattr(builtins, n)]


# Rewrite rules in the order a debugger tries them: the few cheap edits of a condition or an
# operator first, then constants and arguments, and last the many swaps of one variable for
# another.
RULE_ORDER = ("flip_comparison", "negate_condition", "change_boolop", "change_arith",
              "off_by_one", "change_literal", "swap_arguments", "swap_variable")


class ScriptedPolicy:
    name = "scripted"

    def __init__(self, max_turns: int):
        self.max_turns = max_turns
        self._gen: Generator[str, str, None] | None = None
        self._turns = 0

    def act(self, messages: list[dict]) -> str:
        self._turns += 1
        if self._turns >= self.max_turns:  # the last turn is always a submit
            return call("submit")
        try:
            if self._gen is None:
                self._gen = self._plan(messages[1]["content"])
                return next(self._gen)
            return self._gen.send(messages[-1]["content"])
        except StopIteration:
            return call("submit")

    def _plan(self, problem: str) -> Generator[str, str, None]:
        cmd = re.search(r"^Run the tests with: (.+)$", problem, re.M)
        test_cmd = cmd.group(1).strip() if cmd else "python -m pytest -q --tb=short"
        out = yield call("bash", test_cmd)
        # the statement lists whole node ids (parameters may hold spaces); the run's summary
        # lines are the fallback
        failing = list(dict.fromkeys(_LISTED.findall(problem))) or \
            list(dict.fromkeys(_FAILED.findall(out)))
        if not failing and not re.search(r"\b\d+ (failed|error)", out):
            return  # nothing fails: submit
        if not failing:
            return
        chosen = " ".join(shlex.quote(t) for t in failing[:5])
        out = yield call("bash", f"{test_cmd} {shlex.quote(failing[0])}")
        # a wrong value (an assertion of the test fails) points at what the function returns;
        # an exception points at the lines of its traceback
        wrong_value = bool(re.search(r"^E\s+(AssertionError|assert )", out, re.M))
        suspects = yield from self._localise(out)
        suspects = suspects[:3]
        listed = False
        i = 0
        while True:
            if i == len(suspects):
                if listed:
                    break
                # nothing fixed at the suspects so far: which functions does the test run?
                listed = True
                tried = {s[:2] for s in suspects}
                more = yield from self._listfuncs(out, test_cmd, failing[0])
                suspects += [s for s in more if s[:2] not in tried]
                continue
            path, func, hot, start = suspects[i]
            i += 1
            if start is None:  # Class.method: the method's def after its class statement
                cls, _, name = func.rpartition(".")
                pattern = f"^\\s*class {cls}\\b|^\\s*def {name}\\(" if cls else f"^\\s*def {name}\\("
                grep = yield call("bash", f"grep -n -E '{pattern}' {shlex.quote(path)}")
                after = 0
                if cls:
                    c = re.search(rf"^(\d+):\s*class {re.escape(cls)}\b", grep, re.M)
                    after = int(c.group(1)) if c else 0
                defs = [int(d.group(1)) for d in re.finditer(r"^(\d+):\s*def ", grep, re.M)
                        if int(d.group(1)) > after]
                if not defs:
                    continue
                start = defs[0]
            view = yield call("bash", f"cat -n {shlex.quote(path)} | sed -n '{start},{start + 79}p'")
            lines = _function_lines(view, start)
            if not lines:
                continue
            nos = sorted(lines)
            snippet = "\n".join(lines[n] for n in nos)
            rank = {r: i for i, r in enumerate(RULE_ORDER)}
            found = [(nos[i - 1], new, rule) for i, new, rule in candidate_fixes(snippet)]
            # lines the traceback names first; then by rule (swaps of variables last); then,
            # for a wrong value, the return lines; then top-down
            found.sort(key=lambda c: (c[0] not in hot, rank.get(c[2], len(rank)) if c[2] == "swap_variable" else 0,
                                      not (wrong_value and lines[c[0]].lstrip().startswith("return")), c[0],
                                      rank.get(c[2], len(rank))))
            cands = [(no, new) for no, new, _ in found]
            current: tuple[int, str] | None = None  # (line, text now in the file) when edited

            def block(no: int, text: str) -> str:
                # the line with its neighbours: a SEARCH text that is unique in the file
                return "\n".join(text if n == no else lines[n] for n in (no - 1, no, no + 1)
                                 if n in lines)

            for no, new in cands:
                if current is not None and current[0] != no:  # restore the previous line
                    yield call("edit", format_edit(path, block(*current), block(current[0], lines[current[0]])))
                    current = None
                old = block(*current) if current else block(no, lines[no])
                res = yield call("edit", format_edit(path, old, block(no, new)))
                if res.startswith("error"):
                    continue
                current = (no, new)
                res = yield call("bash", f"{test_cmd} {chosen}")
                if _green(res):
                    full = yield call("bash", test_cmd)
                    if _green(full):
                        return  # fixed: submit
            if current is not None:
                yield call("edit", format_edit(path, block(*current), block(current[0], lines[current[0]])))

    def _localise(self, out: str) -> Generator[str, str, list]:
        """Suspect functions (file, name, lines named by the traceback), deepest frame first:
        package frames of the traceback; else the functions the failing test calls (from its
        failing line, then from its source), located with grep."""
        suspects: list[tuple[str, str, set[int], int | None]] = []  # file, def, hot lines, def line
        test_frames, names = [], []
        for m in _FRAME.finditer(out):
            path, line, func = m.group(1), int(m.group(2)), m.group(3)
            if _TESTY.search(path):
                test_frames.append((path, func))
                nxt = out[m.end():].split("\n", 2)
                if len(nxt) > 1:
                    names += _called_names(nxt[1])
                continue
            if path.startswith("/"):  # the standard library
                continue
            found = next((s for s in suspects if s[:2] == (path, func)), None)
            if found:
                found[2].add(line)
            else:
                suspects.insert(0, (path, func, {line}, None))
        if suspects:
            return suspects
        if not names and test_frames:  # read the test itself
            path, func = test_frames[-1]
            grep = yield call("bash", f"grep -n -E '^\\s*def {func}\\(' {shlex.quote(path)}")
            m = re.search(r"^(\d+):\s*def ", grep, re.M)
            if m:
                start = int(m.group(1))
                view = yield call("bash", f"cat -n {shlex.quote(path)} | sed -n '{start},{start + 39}p'")
                body = _function_lines(view, start)
                for no in sorted(body)[1:]:
                    names += _called_names(body[no])
        for name in list(dict.fromkeys(names))[:3]:
            grep = yield call("bash", f"grep -rn --include=*.py -E '^\\s*def {name}\\(' . "
                                      f"| grep -v -E '(^|/)(tests?/|test_)' | head -5")
            for g in re.finditer(r"^\./(\S+?\.py):(\d+):", grep, re.M):
                if not any(s[:2] == (g.group(1), name) for s in suspects):
                    suspects.append((g.group(1), name, set(), int(g.group(2))))
        return suspects

    def _listfuncs(self, out: str, test_cmd: str, test_id: str) -> Generator[str, str, list]:
        """Which of the repository's functions the failing test runs at all: the standard
        library's call lister (``python -m trace --listfuncs``) around the same pytest run."""
        listed = yield call("bash", test_cmd.replace("python -m pytest", "python -m trace --listfuncs "
                                                     "--module pytest", 1)
                            + f" {shlex.quote(test_id)} 2>&1 | grep -E 'filename: /work/' "
                            "| grep -v -E '/(tests?/|test_[^/]*\\.py)' "
                            "| grep -v -E 'funcname: (<module>|<lambda>|[A-Z_][A-Za-z0-9_]*$)' | head -60")
        ran = re.findall(r"filename: /work/(\S+?\.py), modulename: \S+, funcname: (\S+)", listed)
        classes = {q.split(".")[0] for _, q in ran if "." in q}
        ran = [(p, q) for p, q in ran if q not in classes and "<" not in q]  # no class bodies
        # functions (or their classes) named in the test's output first, then listing order
        ran.sort(key=lambda r: not any(part in out for part in r[1].split(".")))
        return [(path, qual, set(), None) for path, qual in ran[:3]]


def _green(out: str) -> bool:
    return bool(re.search(r"\b\d+ passed\b", out)) and not re.search(r"\b\d+ (failed|error)", out)


def _function_lines(view: str, start: int) -> dict[int, str]:
    """Numbered lines of ``cat -n`` output from a def at ``start`` to the end of its body."""
    lines: dict[int, str] = {}
    indent = None
    for row in view.splitlines():
        nm = _NUMBERED.match(row)
        if not nm:
            continue
        no, text = int(nm.group(1)), nm.group(2)
        if indent is None:
            indent = len(text) - len(text.lstrip())
        if no > start and text.strip() and len(text) - len(text.lstrip()) <= indent:
            break  # the function ends where the indentation comes back
        lines[no] = text
    return lines


class PolicyUnavailable(ConnectionError):
    """The policy's server could not be reached, or kept failing, after its retries."""


class OpenAIPolicy:
    """Chat completions over HTTP (the OpenAI wire format); observations go back as user
    turns, since tool results of this text protocol are not OpenAI function calls."""
    name = "openai"

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None,
                 temperature: float = 0.0, max_tokens: int = 1024, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 2.0):
        self.retries, self.backoff = retries, backoff
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.key = os.environ.get(api_key_env) if api_key_env else None
        self.timeout = timeout

    def _post(self, req) -> dict:
        """The server's JSON reply. Overloaded (429, 5xx) or unreachable: retried with backoff,
        then PolicyUnavailable. Any other HTTP error is this request's own (a context over the
        model's length...): a ValueError, which ends the episode."""
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as err:
                why = f"HTTP {err.code}: {err.read()[:300]!r}"
                if err.code != 429 and err.code < 500:
                    raise ValueError(f"{self.url}: {why}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                why = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        raise PolicyUnavailable(f"{self.url}: {why} ({self.retries + 1} tries)")

    def act(self, messages: list[dict]) -> str:
        wire = [{"role": "user" if m["role"] == "tool" else m["role"], "content": m["content"]}
                for m in messages]
        body = json.dumps({"model": self.model, "messages": wire, "temperature": self.temperature,
                           "max_tokens": self.max_tokens, "stop": STOPS}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        reply = self._post(req)
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{self.url}: not a chat-completions reply: {str(reply)[:300]}") from None
        # the stop sequence is cut from the reply: put the call's end back so that it parses.
        # Not when the reply was cut at max_tokens ("length"): its call is unfinished (a create
        # with half a file) and must not run; unparsed, the agent is told as for any bad call.
        if "<tool:" in text and not CALL_RE.search(text) and choice.get("finish_reason") != "length":
            text = text.rstrip("\n") + "\n</tool>"
        return text


class ModelPolicy:
    """The model being trained as the policy (phase `rl`, model/rl.py): the conversation is
    rendered the way SFT's `sft_agent` documents are (stages/documents.py: each message
    `<role>content<|end_of_turn|>`), the assistant marker is written, and ``generate`` (prompt
    token ids, turn number -> sampled ids) writes the turn up to its end-of-turn. Every
    (prompt, completion) pair is kept in ``turns`` for the policy-gradient update.

    A conversation longer than the context keeps its system prompt and task and the latest
    messages that fit whole, as SFT's per-turn documents do (stages/pack.agent_turn_documents).
    A task that alone leaves no room for a reply is a ValueError: the loop ends the episode
    there (stop reason ``policy_error``) with no reward, as a budget would."""
    name = "megatron"

    def __init__(self, generate, tokenizer, *, max_context: int, max_new_tokens: int):
        self.generate, self.tok = generate, tokenizer
        self.max_context, self.max_new_tokens = max_context, max_new_tokens
        self.turns: list[tuple[list[int], list[int]]] = []

    def act(self, messages: list[dict]) -> str:
        from stages.documents import ASSISTANT, END_OF_TURN, ROLES, history_that_fits, message_text
        from codeworld.tokens import END_OF_TEXT, encode_batch

        # each message apart (its role and end-of-turn are special tokens: the same ids as the
        # whole text's), so that whole messages can be left out; a command's output that prints
        # a token's text is text, as in the SFT documents
        pieces = encode_batch(self.tok, [message_text(ROLES[m["role"]], m["content"])
                                         for m in messages])
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                     len(messages))
        head = [t for p in pieces[:first] for t in p]
        budget = self.max_context - self.max_new_tokens - 1 - len(head)
        if budget < 0:
            raise ValueError(f"the task's {len(head)} tokens leave no room for a reply of "
                             f"{self.max_new_tokens} in {self.max_context} (rl.agent_seq_length)")
        kept = history_that_fits([len(p) for p in pieces[first:]], budget)
        prompt = head + [t for p in pieces[len(pieces) - kept:] for t in p] \
            + [self.tok.token_to_id(ASSISTANT)]
        out = self.generate(prompt, len(self.turns))
        self.turns.append((prompt, out))
        reply = self.tok.decode(out, skip_special_tokens=False)
        for stop in (END_OF_TURN, END_OF_TEXT):
            reply = reply.split(stop, 1)[0]
        return reply


def make_policy(name: str, cfg) -> object:
    """``cfg``: the ``agent`` params section."""
    if name == "scripted":
        return ScriptedPolicy(cfg.max_turns)
    if name == "openai":
        o = cfg.openai
        return OpenAIPolicy(o.base_url, o.model, api_key_env=o.api_key_env,
                            temperature=o.temperature, max_tokens=o.max_tokens,
                            timeout=o.timeout_seconds)
    raise ValueError(f"unknown policy {name!r} (known: scripted, openai)")
