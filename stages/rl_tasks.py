"""RL's task pool and its verifiable rewards (phase `rl`, model/rl.py).

Kinds of prompt, each asked exactly as SFT taught it (codeworld/prompts.py):
- `output`: CruxEval-O style, code + call -> the repr of the return value;
- `next_frame`: a trace prompt and the trace's first k frames -> frame k+1 (locals, action);
- `agent`: a mutate-fix task of the agent stage, the model as the policy in the agent loop.

Ground truth comes from the sandbox, not from the dataset: every program of the pool is run
once more through the tracer in the sandbox when the pool is made (`prepare_pool`), and an
item is kept only when that run agrees with its trace record (a program whose output changes
from run to run cannot score an answer); the pool file caches the result for the run and its
resumes. Only non-held-out records are used (codeworld/split.py), so evaluation stays unseen.

Rewards are binary:
- output: 1 when the turn ended (end-of-turn or end-of-text) and the predicted repr is the real
  one, exactly (CWM's output-prediction metric), or is a Python literal whose repr is the real
  one (`[1,2]` for `[1, 2]`, `"a"` for `'a'`). The literal is read with ast.literal_eval on the
  host, which evaluates no code; it only forgives formatting.
- next_frame: 1 when the text up to the first `<|frame_sep|>` is the real frame, exactly.
- agent: the hidden tests' reward of the agent environment (stages/agent/reward.py).
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections import Counter
from pathlib import Path

from codeworld import prompts
from codeworld.config import Params
from codeworld.shards import Dataset, dumps
from codeworld.split import corpus_id, heldout
from codeworld.storage import Storage, write_file_atomic
from codeworld.tokens import END_OF_TEXT, ROLE_TOKENS, TRACE_TOKENS, Text, encode
from stages.tracer.reprs import cut_short

FRAME_SEP = TRACE_TOKENS[1]
END_OF_TURN = ROLE_TOKENS[4]
KINDS = ("output", "next_frame")


def output_reward(pred: str | None, truth: str) -> float:
    """``pred``: the predicted repr (prompts.output_answer_of), None when the turn never ended
    (cut at max_new_tokens)."""
    if pred is None:
        return 0.0
    if pred == truth:
        return 1.0
    try:
        value = ast.literal_eval(pred)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return 0.0
    try:
        return 1.0 if repr(value) == truth else 0.0
    except (ValueError, RecursionError):   # an int over the repr digit limit
        return 0.0


def frame_reward(frame: str | None, truth: str) -> float:
    """``frame``: the predicted frame's text before its `<|frame_sep|>`, None when no frame
    separator ended it (end-of-text, or cut at max_new_tokens)."""
    return 1.0 if frame is not None and frame + FRAME_SEP == truth else 0.0


def reward(item: dict, tok, ids: list[int]) -> float:
    """A completion's reward from its token ids: the answer ends at the first stop *token*
    (a value's text may spell one: the tracer escapes only a frame's JSON, and a repr is
    Plain text)."""
    if item["kind"] == "output":
        pred, ended = prompts.output_answer_of(tok, ids)
        return output_reward(pred if ended else None, item["answer"])
    if item["kind"] == "next_frame":
        sep = tok.token_to_id(FRAME_SEP)
        if sep not in ids:
            return 0.0
        end = ids.index(sep)
        if tok.token_to_id(END_OF_TEXT) in ids[:end]:
            return 0.0   # the trace ended before the frame did
        return frame_reward(tok.decode(ids[:end], skip_special_tokens=False), item["answer"])
    raise ValueError(f"pool item {item.get('id')!r}: no text reward for kind {item['kind']!r}")


def split_frames(trace: str) -> list[str]:
    """The frames of a trace, each with its closing `<|frame_sep|>`; a trailing end-of-text
    is not a frame."""
    parts = trace.split(FRAME_SEP)
    return [p + FRAME_SEP for p in parts[:-1]]


def _rank(seed: int, kind: str, rid: str) -> str:
    return hashlib.sha256(f"{seed}\0{kind}\0{rid}".encode()).hexdigest()


def _count(tok, text: Text) -> int:
    return len(encode(tok, text))


def _candidates(params: Params, tok, records: list[dict], counts: Counter) -> dict[str, list[dict]]:
    """Pool items per kind before the sandbox check, in a seeded order, pool_size at most."""
    cfg = params.rl
    room = cfg.seq_length - cfg.max_new_tokens
    out: dict[str, list[dict]] = {k: [] for k in KINDS if cfg.tasks.get(k, 0) > 0}
    for kind in out:
        ranked = sorted(records, key=lambda r: _rank(cfg.seed, kind, str(r["id"])))
        for rec in ranked:
            if len(out[kind]) >= cfg.pool_size:
                break
            item = _output_item(rec, tok, room, cfg.max_new_tokens) if kind == "output" else \
                _frame_item(rec, tok, room, cfg.max_new_tokens, cfg.seed)
            if isinstance(item, str):
                counts[f"{kind}_skipped_{item}"] += 1
            else:
                out[kind].append(item)
    return out


def _output_item(rec: dict, tok, room: int, max_new: int) -> dict | str:
    if not prompts.has_output_task(rec):
        return "no_task"
    if cut_short(rec["result"]):
        return "truncated_value"
    prompt = prompts.output_prompt(rec["code"], rec["call"])
    if _count(tok, prompt) > room:
        return "prompt_too_long"
    if _count(tok, prompts.output_answer(rec["result"])) > max_new:
        return "answer_too_long"
    return {"kind": "output", "id": str(rec["id"]), "prompt": prompt, "answer": rec["result"],
            "code": rec["code"], "call": rec["call"]}


def _frame_item(rec: dict, tok, room: int, max_new: int, seed: int) -> dict | str:
    if rec.get("status") not in ("ok", "exception") or not all(
            isinstance(rec.get(k), str) for k in ("code", "call", "prompt", "trace")):
        return "no_task"   # repository traces have no standalone program to rerun
    frames = split_frames(rec["trace"])
    if len(frames) < 2:
        return "too_few_frames"
    # Every piece ends with a special token, so token counts add up exactly.
    sizes = [_count(tok, f) for f in frames]
    base = _count(tok, prompts.trace_prompt(rec))
    fits, used = [], base
    for k in range(1, len(frames)):
        used += sizes[k - 1]
        if used > room:
            break
        if sizes[k] <= max_new and not cut_short(frames[k]):
            fits.append(k)
    if not fits:
        return "prompt_too_long"
    k = fits[int(_rank(seed, "frame", str(rec["id"]))[:8], 16) % len(fits)]
    return {"kind": "next_frame", "id": str(rec["id"]), "frame": k,
            "prompt": prompts.trace_prompt(rec) + "".join(frames[:k]), "answer": frames[k],
            "code": rec["code"], "call": rec["call"], "trace": rec["trace"]}


def _sandbox_check(params: Params, items: list[dict], counts: Counter) -> list[dict]:
    """Run each distinct program once in the sandbox; keep items whose run agrees."""
    from stages.trace_runner import trace_requests

    programs: dict[tuple[str, str], int] = {}
    for it in items:
        programs.setdefault((it["code"], it["call"]), len(programs))
    requests = [{"id": str(i), "code": code, "call": call} for (code, call), i in programs.items()]
    runs = trace_requests(requests, params.traces.limits, workers=params.traces.workers,
                          batch_size=params.traces.batch_size,
                          isolation=params.traces.isolation) if requests else []
    counts["sandbox_runs"] = len(requests)
    kept = []
    for it in items:
        run = runs[programs[(it["code"], it["call"])]]
        if it["kind"] == "output":
            same = run.get("status") == "ok" and run.get("result") == it["answer"]
        else:
            same = run.get("status") in ("ok", "exception") and run.get("trace") == it["trace"]
        if same:
            kept.append({k: v for k, v in it.items() if k not in ("code", "call", "trace")})
        else:
            counts[f"{it['kind']}_dropped_sandbox_{run.get('status')}"] += 1
    return kept


def _agent_items(params: Params, storage: Storage, tok, counts: Counter) -> list[dict]:
    from stages.agent import REPO_CACHE
    from stages.agent.envs import build_env
    from stages.agent.loop import user_prompt
    from stages.agent.policies import SYSTEM_PROMPT
    from stages.agent.reward import TreeMismatch, check_tree
    from stages.documents import ROLES, message_text

    cfg = params.rl
    if not cfg.agent_interval:
        return []
    if not storage.exists("agent/tasks/manifest.json"):
        counts["agent_no_tasks_dataset"] = 1
        return []
    repos = {r.name: r for r in params.agent.repositories}
    built: dict[str, object] = {}   # repository name -> its Env, or None when it failed
    items = []
    for task in Dataset(storage.sub("agent", "tasks")):
        if not isinstance(task, dict) or "id" not in task:
            counts["agent_broken_tasks"] += 1
            continue
        tid = str(task["id"])
        if heldout(corpus_id({"task_id": tid}), params.pack.heldout_percent, params.pack.seed):
            counts["agent_heldout"] += 1
            continue
        repo = repos.get(task.get("repo"))
        if repo is None:
            counts["agent_skipped_repo_not_configured"] += 1
            continue
        if repo.name not in built:   # fetched (once) and checked here, not mid-training
            try:
                built[repo.name] = build_env(repo, REPO_CACHE)
            except Exception:   # counted: the other tasks stand
                built[repo.name] = None
        if built[repo.name] is None:
            counts["agent_skipped_env_error"] += 1
            continue
        try:   # the pinned tree is still the one the bug was made in (offsets apply)
            check_tree(task, built[repo.name])
        except (TreeMismatch, OSError, UnicodeDecodeError):   # a file gone is a mismatch too
            counts["agent_skipped_tree_mismatch"] += 1
            continue
        except (KeyError, TypeError):   # no mutation/file in the record
            counts["agent_broken_tasks"] += 1
            continue
        try:
            # as the model as policy encodes it (stages/agent/policies.ModelPolicy): the task
            # is Plain text, whatever token it spells
            first = (*message_text(ROLES["system"], SYSTEM_PROMPT),
                     *message_text(ROLES["user"], user_prompt(task)), ROLES["assistant"])
        except (KeyError, TypeError):   # no problem statement: counted, the others stand
            counts["agent_broken_tasks"] += 1
            continue
        if _count(tok, first) > cfg.agent_seq_length - cfg.agent_max_new_tokens:
            counts["agent_skipped_prompt_too_long"] += 1
            continue
        items.append({"kind": "agent", "id": tid, "task": task})
    items.sort(key=lambda it: _rank(cfg.seed, "agent", it["id"]))
    return items


def prepare_pool(params: Params, tok, path: Path) -> dict:
    """Write the pool (JSON lines, kinds in KINDS order then agent) to `path`; its stats."""
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    counts: Counter = Counter()
    records = []
    for rec in Dataset(storage.sub("traces")):
        if not isinstance(rec, dict) or "id" not in rec:
            counts["broken_records"] += 1
            continue
        if heldout(corpus_id(rec), params.pack.heldout_percent, params.pack.seed):
            counts["heldout"] += 1
            continue
        records.append(rec)
    by_kind = _candidates(params, tok, records, counts)
    kept = _sandbox_check(params, [it for k in by_kind for it in by_kind[k]], counts)
    kept += _agent_items(params, storage, tok, counts)
    for it in kept:
        counts[f"pool_{it['kind']}"] += 1
    for kind in by_kind:
        if not counts[f"pool_{kind}"]:
            raise ValueError(f"rl.tasks asks for {kind} prompts and none is usable "
                             f"({dict(sorted(counts.items()))}); check data/traces and "
                             f"rl.seq_length / rl.max_new_tokens")
    body = b"".join(dumps(it) + b"\n" for it in kept)
    write_file_atomic(path, body)
    return dict(sorted(counts.items()))


def read_pool(path: Path) -> dict[str, list[dict]]:
    pool: dict[str, list[dict]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            item = json.loads(line)
            pool.setdefault(item["kind"], []).append(item)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{n}: not a pool item ({err})") from None
    return pool
