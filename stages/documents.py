"""How a record of each shard dataset becomes a training document: text segments, each in or
out of the loss. Written once for the tokenizer (its training text) and pack (its tokens and
loss masks).

Formats: `code`, `trace`, `agent` (pre- and mid-training: everything in the loss but masked
observations) and the SFT tasks, whose prompts are out of the loss and answers in it, written
with codeworld/prompts.py so RL, evaluation and the debugger ask exactly what SFT taught:
`sft_trace` (trace prompt -> frames + end-of-text), `sft_output` (code + call -> the return
value's repr), `sft_agent` (a trajectory with the loss on the assistant's turns only; pack
makes one document per assistant turn when the source has a window, history_that_fits).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from codeworld import prompts
from codeworld.tokens import ROLE_TOKENS, Plain, Text, assistant_parts, joined
from stages.tracer.reprs import cut_short

SYSTEM, USER, ASSISTANT, TOOL_RESULT, END_OF_TURN = ROLE_TOKENS
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL_RESULT,
         "observation": TOOL_RESULT}
Segment = tuple[Text, bool]   # (text, counts in the loss)
# Text from outside (a corpus file, a message's content, a call's result) is Plain: its special
# tokens' text is tokenised as text (codeworld/tokens.py); the traces are our own markup, their
# values escaped by the tracer and their programs free of the tokens (trace_runner).


class DocumentError(ValueError):
    """A record that cannot be rendered in its source's format (counted, never fatal)."""


class NotATask(DocumentError):
    """A sound record that holds no task of this format (a repository trace has no prompt, a
    call that raised has no output to predict): skipped and counted apart from broken ones."""


def _field(record: dict, name: str, kind: type = str):
    value = record.get(name)
    if not isinstance(value, kind):
        raise DocumentError(f"field {name!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _masked(seed: int, record_id: str, turn: int, share: float) -> bool:
    """Whether one observation is out of the loss: a hash, not an RNG stream, so the choice of
    a turn never depends on the other records (CWM masks 50% of observations at random)."""
    if share <= 0:
        return False
    h = hashlib.sha256(f"{seed}\0{record_id}\0{turn}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < share


def object_records(records: Iterable, counts: dict, key: str) -> Iterator[dict]:
    """The records that are JSON objects; each that is not (a shard member of a foreign
    dataset that is a JSON list or number) is counted under ``counts[key]`` and left out."""
    for record in records:
        if isinstance(record, dict):
            yield record
        else:
            counts[key] = counts.get(key, 0) + 1


def render(record: dict, fmt: str, *, observation_mask: float = 0.0, seed: int = 0) -> list[Segment]:
    if fmt == "code":
        return [(Plain(_field(record, "text")), True)]
    if fmt == "trace":
        # The prompt (context + `main` call) and the frames: CWM trains on both. A repository
        # trace (a call from a test into the package) has frames only.
        prompt = record.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise DocumentError(f"field 'prompt' is {type(prompt).__name__}, expected str")
        return [(prompt or "", True), (_field(record, "trace"), True)]
    if fmt == "agent":
        rid = str(record.get("id", ""))
        return [(message_text(role, content),
                 not (role == TOOL_RESULT and _masked(seed, rid, turn, observation_mask)))
                for turn, role, content in _turns(record)]
    if fmt == "sft_trace":
        if record.get("prompt") is None:
            raise NotATask("no prompt (a repository trace: frames without a context)")
        for name in ("prompt", "trace"):
            _field(record, name)   # a wrong type is a broken record, not a missing task
        return [(prompts.trace_prompt(record), False), (prompts.trace_answer(record), True)]
    if fmt == "sft_output":
        if record.get("status") == "ok":
            for name in ("code", "call", "result"):   # present with a wrong type: broken
                if record.get(name) is not None:
                    _field(record, name)
        if not prompts.has_output_task(record):
            raise NotATask(f"no output task: the call did not return (status "
                           f"{record.get('status')!r})" if record.get("status") != "ok" else
                           "no output task: no code and call (a repository trace)")
        if cut_short(record["result"]):
            # The tracer cut the repr at its limit: no program prints that text, so it would
            # teach an answer RL and evaluation never ask for (they skip such tasks too).
            raise NotATask("no output task: the result repr was cut short by the tracer")
        return [(prompts.output_prompt(record["code"], record["call"]), False),
                (prompts.output_answer(record["result"]), True)]
    if fmt == "sft_agent":
        # The role marker opens the turn out of the loss, as output_prompt ends with it: at
        # inference the harness writes it and the model writes the turn.
        out: list[Segment] = []
        for _, role, content in _turns(record):
            if role == ASSISTANT:
                out += [(role, False), ((*message_parts(role, content), END_OF_TURN), True)]
            else:
                out.append((message_text(role, content), False))
        if not any(keep for _, keep in out):
            raise NotATask("no assistant turn")
        return out
    raise DocumentError(f"unknown document format {fmt!r}")


def _turns(record: dict) -> list[tuple[int, str, str]]:
    """(index, role token, content) of each message of a trajectory."""
    messages = _field(record, "messages", list)
    out = []
    for turn, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise DocumentError(f"messages[{turn}] has no known role "
                                f"(one of {', '.join(sorted(ROLES))})")
        out.append((turn, ROLES[msg["role"]], _field(msg, "content")))
    return out


def message_parts(role: str, content: str) -> tuple[str, ...]:
    """A message's content as text parts: an assistant turn's tool-call markers are tokens,
    everything else any message holds (a task, a command's output, a file) is Plain."""
    return assistant_parts(content) if role == ASSISTANT else (Plain(content),)


def message_text(role: str, content: str) -> tuple[str, ...]:
    """One whole message as the agent formats render and the model as policy write it:
    `<role>content<|end_of_turn|>`."""
    return (role, *message_parts(role, content), END_OF_TURN)


def history_that_fits(lengths: list[int], budget: int) -> int:
    """How many of the latest messages (token counts ``lengths``, oldest first) fit whole in
    ``budget`` tokens, counted from the newest back. An agent turn's context when its whole
    history does not fit: the system prompt and the task, then the most recent messages.
    SFT's per-turn documents (stages/pack.py) and the model as the agent's policy
    (stages/agent/policies.ModelPolicy) both cut history this way."""
    used = kept = 0
    for length in reversed(lengths):
        if used + length > budget:
            break
        used += length
        kept += 1
    return kept


def text_of(segments: list[Segment]) -> str:
    return "".join(joined(t) for t, _ in segments)
