"""The task prompts the later phases share: SFT trains on them, RL samples from them, evaluation
and the debugger ask them. Written once so a model is always asked the way it was taught.

- trace prediction: the trace record's own prompt, `<|trace_context_start|>` + context (the
  source with the synthetic `def main():  # << START_OF_TRACE`) + `<|frame_sep|>`; the answer
  is the frames from main's first line frame on (main's call frame is written nowhere),
  ending with end-of-text, as in BRIEF.md's example.
- output prediction (CruxEval-O style): a user turn with the code and the call, an assistant
  turn that is the repr of the return value.
"""

from __future__ import annotations

from codeworld.tokens import END_OF_TEXT, ROLE_TOKENS, Plain, Text

SYSTEM, USER, ASSISTANT, TOOL_RESULT, END_OF_TURN = ROLE_TOKENS


def trace_prompt(record: dict) -> str:
    """`<|trace_context_start|>` + context + `<|frame_sep|>`: what the model sees before
    predicting frames. No frame of main's is in it: the first frame the model writes is
    main's first line (`return f(...)`)."""
    return record["prompt"]


def trace_answer(record: dict) -> str:
    return record["trace"] if record["trace"].endswith(END_OF_TEXT) else record["trace"] + END_OF_TEXT


def output_prompt(code: str, call: str) -> str:
    code = code if code.endswith("\n") else code + "\n"
    return (f"{USER}{code}\n# What does `{call}` return? Answer with its repr."
            f"{END_OF_TURN}{ASSISTANT}")


def output_answer(result_repr: str) -> Text:
    """The repr, then the end of the turn. The repr is text the program made: a token's text
    in it (a function that returns "<|user|>") is text (codeworld/tokens.Plain)."""
    return (Plain(result_repr), END_OF_TURN)


def output_answer_of(tok, ids: list[int]) -> tuple[str, bool]:
    """The predicted repr of a generated assistant turn, and whether the turn ended: the text
    of its ids before the first end-of-turn or end-of-text *token*. Not a cut of the decoded
    text at those tokens' text, which a repr may spell ("'<|end_of_turn|>'" is output_answer's
    Plain text, so the model learnt to write it as text)."""
    stops = {tok.token_to_id(END_OF_TURN), tok.token_to_id(END_OF_TEXT)}
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    kept = ids if end is None else ids[:end]
    return tok.decode(kept, skip_special_tokens=False).strip(), end is not None


def has_output_task(record: dict) -> bool:
    """Output prediction needs a function call that returned (not raised, not timed out)."""
    return (record.get("status") == "ok" and isinstance(record.get("result"), str)
            and isinstance(record.get("code"), str) and isinstance(record.get("call"), str))
