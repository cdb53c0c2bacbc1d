"""The special tokens every stage agrees on: each is one token id in the tokenizer, so a model
sees CWM's trace structure and the agent's tool calls as single symbols."""

from __future__ import annotations

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
