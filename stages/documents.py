"""How a record of each shard dataset becomes a training document: text segments, each in or
out of the loss. Written once for the tokenizer (its training text) and pack (its tokens and
loss masks)."""

from __future__ import annotations

import hashlib

from codeworld.tokens import ROLE_TOKENS

SYSTEM, USER, ASSISTANT, TOOL_RESULT, END_OF_TURN = ROLE_TOKENS
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL_RESULT,
         "observation": TOOL_RESULT}
Segment = tuple[str, bool]   # (text, counts in the loss)


class DocumentError(ValueError):
    """A record that cannot be rendered in its source's format (counted, never fatal)."""


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


def render(record: dict, fmt: str, *, observation_mask: float = 0.0, seed: int = 0) -> list[Segment]:
    if fmt == "code":
        return [(_field(record, "text"), True)]
    if fmt == "trace":
        # The prompt (context + `main` call) and the frames: CWM trains on both. A repository
        # trace (a call from a test into the package) has frames only.
        prompt = record.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise DocumentError(f"field 'prompt' is {type(prompt).__name__}, expected str")
        return [(prompt or "", True), (_field(record, "trace"), True)]
    if fmt == "agent":
        messages = _field(record, "messages", list)
        rid = str(record.get("id", ""))
        out: list[Segment] = []
        for turn, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in ROLES:
                raise DocumentError(f"messages[{turn}] has no known role "
                                    f"(one of {', '.join(sorted(ROLES))})")
            content = _field(msg, "content")
            role = ROLES[msg["role"]]
            keep = not (role == TOOL_RESULT and _masked(seed, rid, turn, observation_mask))
            out.append((f"{role}{content}{END_OF_TURN}", keep))
        return out
    raise DocumentError(f"unknown document format {fmt!r}")


def text_of(segments: list[Segment]) -> str:
    return "".join(t for t, _ in segments)
