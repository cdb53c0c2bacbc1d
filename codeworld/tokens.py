"""The special tokens every stage agrees on: each is one token id in the tokenizer, so a model
sees CWM's trace structure and the agent's tool calls as single symbols."""

from __future__ import annotations

import re

# CWM's trace format (BRIEF.md, "The CWM trace format"), in the order of the spec.
TRACE_TOKENS = (
    "<|trace_context_start|>", "<|frame_sep|>", "<|call_sep|>", "<|line_sep|>",
    "<|return_sep|>", "<|exception_sep|>", "<|action_sep|>", "<|arg_sep|>",
)
# The agent's tool calls: `<tool: NAME>\n...\n</tool>`, one per turn (CWM's ForagerAgent tools).
TOOL_TOKENS = ("<tool: bash>", "<tool: edit>", "<tool: create>", "<tool: submit>", "</tool>")
# Turns of a trajectory as the pack stage renders them.
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool_result|>", "<|end_of_turn|>")
END_OF_TEXT = "<|end_of_text|>"
PAD = "<|pad|>"

# Ids 0..N-1 in this order: fixed, so they never move when the vocabulary size changes.
SPECIAL_TOKENS = (END_OF_TEXT, PAD, *TRACE_TOKENS, *TOOL_TOKENS, *ROLE_TOKENS)
EOD_ID = 0
PAD_ID = 1


def reserved_token(text: str) -> str | None:
    """The first special token whose text ``text`` holds, else None. A program to trace must
    hold none: its source goes into the trace's context as our own markup."""
    if "<|" not in text and "tool" not in text:
        return None
    return next((t for t in SPECIAL_TOKENS if t in text), None)

# A tool call as the agent writes it (stages/agent/tools.py parses it with this): it ends at the
# first `</tool>` that starts a line or ends one, so a `</tool>` inside a line of a file's
# content is content.
CALL_RE = re.compile(r"<tool: *([A-Za-z_]+)>\n?(.*?)\n?"
                     r"(?:(?<=\n)</tool>|</tool>(?=[ \t]*(?:\n|\Z)))", re.S)
CALL_END = TOOL_TOKENS[-1]


class Plain(str):
    """Text from outside the pipeline's own markup (a corpus file, a message, a command's
    output): a special token's text in it is text, tokenised byte by byte like the rest, never
    the token. A source file that writes "<|user|>" (a chat template) or a `cat` that prints
    "</tool>" must not reach the model as the turn or call it would mark."""
    __slots__ = ()


# What the stages tokenise: one str (our own markup: every special token's text in it is the
# token, e.g. a trace, whose values are escaped by the tracer) or a tuple of parts, each a
# markup str or a Plain.
Text = str | tuple[str, ...]


def joined(text: Text) -> str:
    return text if isinstance(text, str) else "".join(text)


def _parts(text: Text) -> tuple[str, ...]:
    return (text,) if isinstance(text, str) else text


def assistant_parts(content: str) -> tuple[str, ...]:
    """An assistant turn's text as parts: each tool call's opening and closing markers markup
    (the tokens of TOOL_TOKENS), everything else, a call's body included, Plain."""
    parts: list[str] = []
    at = 0
    for m in CALL_RE.finditer(content):
        opener = content[m.start():m.start(1) + len(m.group(1)) + 1]
        if opener not in TOOL_TOKENS:   # `<tool:  bash>`, `<tool: run>`: not a token's text
            continue
        end = m.end() - len(CALL_END)
        parts += [Plain(content[at:m.start()]), opener, Plain(content[m.start() + len(opener):end]),
                  CALL_END]
        at = m.end()
    parts.append(Plain(content[at:]))
    return tuple(p for p in parts if p)


# id(tokenizer) -> (tokenizer, its twin that splits no special token); the tokenizer is kept so
# that its id is never reused while the entry lives
_LITERAL: dict[int, tuple[object, object]] = {}


def _literal(tok):
    """The same tokenizer with its special tokens' text encoded as bytes (tokenizers'
    `encode_special_tokens`): a twin, because that switch is the tokenizer's own state and a
    tokenizer is shared (the agent's policies encode from threads)."""
    entry = _LITERAL.get(id(tok))
    if entry is None or entry[0] is not tok:
        from tokenizers import Tokenizer

        twin = Tokenizer.from_str(tok.to_str())
        twin.encode_special_tokens = True
        entry = _LITERAL[id(tok)] = (tok, twin)
    return entry[1]


def encode_batch(tok, texts: list[Text]) -> list[list[int]]:
    """The token ids of each text (see Text): its markup parts encoded by ``tok``, its Plain
    parts with no special token split out, in one batch call each."""
    parts = [(i, p) for i, t in enumerate(texts) for p in _parts(t) if p]
    markup = iter(tok.encode_batch([str(p) for _, p in parts if not isinstance(p, Plain)]))
    plain_texts = [str(p) for _, p in parts if isinstance(p, Plain)]
    plain = iter(_literal(tok).encode_batch(plain_texts) if plain_texts else [])
    out: list[list[int]] = [[] for _ in texts]
    for i, p in parts:
        out[i] += next(plain if isinstance(p, Plain) else markup).ids
    return out


def encode(tok, text: Text) -> list[int]:
    return encode_batch(tok, [text])[0]
