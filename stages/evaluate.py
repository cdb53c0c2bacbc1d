"""Stage `evaluate`: every trained phase on held-out data (params `evaluate`).

Held out means the corpus ids `codeworld/split.py` keeps out of the tokenizer and every training
source (pack.heldout_percent / seed): no phase has seen these programs or documents. Each phase
in `evaluate.phases` whose checkpoint exists (`checkpoints/<phase>/latest.json`) is loaded in
this process (model/generate.py, KV-cached greedy decoding) and measured on the same set. A
phase that cannot be evaluated is left out like one without a checkpoint (listed in
summary.json's `missing`), the reason in its `unusable`, the file named, while the others are
evaluated: one trained with another tokenizer than the storage root's (run.json's
tokenizer_sha256, as the export checks), a latest.json garbled or naming a folder that is
gone, a checkpoint missing a file or holding one of another size than it was saved with
(model/checkpoint.damage) or that torch cannot read, a run.json that does not say which run
made it. Predictions (`<phase>.jsonl`) of a phase not evaluated are removed with the summary
they would not belong to.

- trace prediction (CWM Table 9): given the trace prompt (`<|trace_context_start|>` + context
  with the synthetic `main` + `<|frame_sep|>`, codeworld/prompts.trace_prompt), the model writes
  the frames, from main's first line frame, until end-of-text; codeworld/trace_metrics.py
  compares them with the real trace;
- output prediction, CruxEval-O style: codeworld/prompts.output_prompt, the answer's repr
  against the real return value; and the value of main's return frame in the predicted trace;
- perplexity per pack source on held-out documents rendered and tokenised by pack's own
  function (stages/pack.source_documents: one end-of-text per document, the source's
  max_document_tokens, window and max_tokens), loss-masked tokens only, in windows of
  `ppl_seq_length` tokens for every phase alike; a source without a held-out document has
  none, and its count (`ppl_documents_<name>` 0) says so;
- rl: its reward curve and success rate up to the evaluated iteration, from the phase's steps
  log, the agent's success from the checkpoint's run totals when it has them (rl_curve).

Programs are drawn once (a seeded hash order among the held-out traces whose prompt + trace fit
`max_program_tokens` and whose trace fits the generation cap `max_new_tokens`), so every phase
answers the same questions; an output answer longer than `output_max_new_tokens` is not asked (a
question the cap leaves no room to answer scores 0 whatever the model; RL's tasks skip them
alike), nor one whose result repr the tracer cut short (no answer is the cut text). Outputs:
metrics/evaluate.json (DVC), the MLflow run `evaluate`, `evaluate/<phase>.jsonl` (each
prediction and its metrics) and `evaluate/summary.json` under the storage root, and
reports/evaluate.md with its plots. A record that cannot be used is counted (`skipped_*`), never
fatal. The summary names each phase's checkpoint by its folder, iteration and run (run.json's
fingerprint; a phase retrained to the same iteration has the same folder): the export's card
takes a phase's figures only when all three are those of the checkpoint it exports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from codeworld.code import Code
from codeworld import prompts
from codeworld.config import Params
from codeworld.shards import Dataset, ShardError, dumps, fingerprint
from codeworld.split import corpus_id, heldout
from codeworld.storage import Storage
from codeworld.tokens import EOD_ID, encode, encode_batch
from codeworld.trace_metrics import frame_metrics, mean_metrics, parse, teacher_forced
from codeworld.tracking import StageRun
from stages import tokenizer as tokenizer_stage
from stages.documents import DocumentError, NotATask, object_records, render
from stages.pack import source_documents
from stages.rl_figures import TOTALS, summary as rl_summary
from stages.tracer.reprs import cut_short
from stages.train_phase import RUN, phase_dir, read_steps

# model.launch (imported through train_phase) starts training; evaluation never runs it
CODE = Code(("stages.evaluate",), skip=("model.launch",))

OUTPUT = "evaluate"
REPORT = "reports/evaluate.md"
METRICS_PATH = "metrics/evaluate.json"
log = logging.getLogger(__name__)


def _order(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def heldout_programs(params: Params, storage: Storage, tok, counts: dict) -> list[dict]:
    """The held-out trace-prediction tasks: records with a prompt and a complete trace (a call
    that returned or raised), small enough, drawn in a seeded order, returned sorted by id.

    Only questions the model can answer within its generation caps are asked, as RL's task
    builder does (stages/rl_tasks.py): a trace longer than max_new_tokens is not drawn
    (`skipped_answer_too_long`, among the held-out traces); a drawn program whose output
    answer (repr + end of turn) is longer than output_max_new_tokens keeps its trace task but
    has no output task (`output_task` False; `skipped_output_too_long`, among the drawn), nor
    has one whose result the tracer cut short (its mark appended: no answer is that text;
    `skipped_output_truncated`, among the drawn). Their `result` stays: the trace's return
    frame holds the same text, which the predicted trace is scored against."""
    cfg = params.evaluate
    for key in ("skipped_answer_too_long", "skipped_output_too_long", "skipped_output_truncated"):
        counts.setdefault(key, 0)
    cands = []
    for record in object_records(Dataset(storage.sub("traces")), counts, "skipped_broken"):
        if not heldout(corpus_id(record), params.pack.heldout_percent, params.pack.seed):
            continue
        counts["heldout_traces"] += 1
        if not isinstance(record.get("prompt"), str) or record.get("status") not in ("ok", "exception"):
            counts["skipped_no_task"] += 1   # a repository trace (no context) or no full trace
            continue
        if not isinstance(record.get("trace"), str) or record.get("id") in (None, ""):
            counts["skipped_broken"] += 1   # no id: its predictions could name no program
            continue
        answer = prompts.trace_answer(record)
        real = parse(answer)
        if not real.valid:   # a record the tracer wrote must parse: count it if not
            counts["skipped_broken"] += 1
            log.warning("held-out trace %s does not parse: %s", record.get("id"), real.errors[:1])
            continue
        prompt_ids = tok.encode(prompts.trace_prompt(record)).ids
        enc = tok.encode(answer)   # prompt and trace apart, as pack encodes their segments
        answer_len = len(enc.ids)
        if len(prompt_ids) + answer_len > cfg.max_program_tokens:
            counts["skipped_too_long"] += 1
            continue
        if answer_len > cfg.max_new_tokens:   # generation stops before the trace could end
            counts["skipped_answer_too_long"] += 1
            continue
        result = record.get("result") if prompts.has_output_task(record) else None
        cands.append({"id": str(record["id"]), "prompt_ids": prompt_ids, "answer": answer,
                      "answer_ids": enc.ids, "answer_offsets": enc.offsets,
                      "answer_tokens": answer_len, "real": real, "result": result,
                      "code": record.get("code"), "call": record.get("call"),
                      "status": record["status"]})
    cands.sort(key=lambda c: _order(cfg.seed, c["id"]))
    chosen = sorted(cands[:cfg.max_programs], key=lambda c: c["id"])
    for c in chosen:   # the answer the output prompt asks for, as RL judges and counts it
        c["output_task"] = False
        if c["result"] is None:
            continue
        if cut_short(c["result"]):
            counts["skipped_output_truncated"] += 1
        elif len(encode(tok, prompts.output_answer(c["result"]))) > cfg.output_max_new_tokens:
            counts["skipped_output_too_long"] += 1
        else:
            c["output_task"] = True
    counts["programs"] = len(chosen)
    counts["output_tasks"] = sum(1 for c in chosen if c["output_task"])
    return chosen


def heldout_streams(params: Params, storage: Storage, tok, counts: dict) -> dict[str, tuple]:
    """Per pack source: held-out documents as pack renders them (stages/pack.source_documents,
    the source's max_document_tokens and window applied), concatenated into (token ids, loss
    mask) up to ppl_max_tokens, and no more than the source's own max_tokens. A source with no held-out
    document is counted (`ppl_documents_<name>` 0) and has no perplexity."""
    out = {}
    for name, src in params.pack.sources.items():
        cap = min(params.evaluate.ppl_max_tokens, src.max_tokens or params.evaluate.ppl_max_tokens)
        try:
            ids, mask = _source_stream(params, storage, tok, name, src, cap, counts)
        except (ShardError, FileNotFoundError, OSError) as err:
            # a damaged shard or a dataset not built: this source is left out, and said so
            counts[f"ppl_missing_{name}"] = 1
            counts.pop(f"ppl_documents_{name}", None)
            log.warning("perplexity: source %s (%s) unreadable: %s", name, src.dataset, err)
            continue
        if counts[f"ppl_documents_{name}"] == 0:
            log.warning("perplexity: source %s (%s) has no held-out document", name, src.dataset)
        if len(ids) > 1:
            out[name] = (ids[:cap + 1], mask[:cap + 1])
    return out


def _source_stream(params: Params, storage: Storage, tok, name: str, src, cap: int,
                   counts: dict) -> tuple[list[int], list[int]]:
    """One source's held-out documents, each rendered and tokenised by pack's own function,
    concatenated until `cap` tokens; counts the documents used, broken and too long."""
    ids: list[int] = []
    mask: list[int] = []
    counts[f"ppl_documents_{name}"] = 0   # zero is said too: no perplexity for lack of data
    for record in object_records(Dataset(storage.sub(src.dataset)), counts, f"ppl_broken_{name}"):
        if len(ids) >= cap:
            break
        if not heldout(corpus_id(record), params.pack.heldout_percent, params.pack.seed):
            continue
        try:
            segments = render(record, src.format, observation_mask=src.observation_mask,
                              seed=params.pack.seed)
        except NotATask:
            continue
        except DocumentError:
            counts[f"ppl_broken_{name}"] = counts.get(f"ppl_broken_{name}", 0) + 1
            continue
        pieces = encode_batch(tok, [text for text, _ in segments])
        docs, left_out = source_documents(segments, pieces, src)
        if left_out:   # pack leaves them out of the source: so does evaluation
            counts[f"ppl_too_long_{name}"] = counts.get(f"ppl_too_long_{name}", 0) + left_out
        for doc_ids, doc_mask in docs:
            ids += doc_ids
            mask += doc_mask
            counts[f"ppl_documents_{name}"] += 1
    return ids, mask


@torch.no_grad()
def perplexity(lm, ids: list[int], mask: list[int], window: int, batch: int = 8) -> dict:
    """Mean negative log-likelihood of the loss-masked tokens, each window of `window` tokens
    predicting its next tokens (the first token of a window has no context, as in training).
    Windows of one length go through the model together (the last one may be shorter)."""
    windows = [(ids[s:s + window + 1], mask[s + 1:s + window + 1])
               for s in range(0, len(ids) - 1, window)]
    by_len: dict[int, list] = {}
    for w in windows:
        by_len.setdefault(len(w[0]), []).append(w)
    total, count = 0.0, 0
    for group in by_len.values():
        for b in range(0, len(group), batch):
            rows = group[b:b + batch]
            toks = torch.tensor([r[0] for r in rows])
            m = torch.tensor([r[1] for r in rows], dtype=torch.float32).reshape(-1)
            logits = lm.logits(toks[:, :-1])
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1).to(logits.device),
                reduction="none").cpu()
            total += float((nll * m).sum())
            count += int(m.sum())
    nll = total / count if count else float("nan")
    return {"nll": nll, "ppl": _exp(nll), "tokens": count}


def _exp(nll: float) -> float:
    """e**nll; infinite past a float's range (a diverged model's mean NLL of 1000 nats: math.exp
    raised OverflowError there, and the stage stopped after evaluating), its nll kept finite."""
    try:
        return math.exp(nll)
    except OverflowError:
        return float("inf")


@torch.no_grad()
def next_frame_metrics(lm, prog: dict) -> dict[str, float]:
    """One forward pass over prompt + real trace: the teacher-forced next-frame metrics
    (codeworld/trace_metrics.teacher_forced), the share of the trace's tokens that are the
    argmax given the real prefix, and its mean NLL per token."""
    n = len(prog["prompt_ids"])
    ids = prog["prompt_ids"] + prog["answer_ids"]
    logits = lm.logits(torch.tensor([ids[:-1]]))[0, n - 1:].cpu()   # predicting answer tokens
    target = torch.tensor(prog["answer_ids"])
    correct = (logits.argmax(-1) == target).tolist()
    out = teacher_forced(prog["answer"], prog["answer_offsets"], correct)
    out["trace_token_accuracy"] = sum(correct) / len(correct)
    out["trace_nll"] = float(torch.nn.functional.cross_entropy(logits, target))
    return out


def evaluate_phase(params: Params, phase: str, iteration_dir: Path, vocab_size: int, tok,
                   programs: list[dict], streams: dict) -> tuple[dict, list[dict]]:
    """One checkpoint (an iter_N directory) on the held-out set: (summary, one row per
    program)."""
    from model import generate

    cfg = params.evaluate
    t0 = time.perf_counter()
    if not iteration_dir.is_dir():
        raise FileNotFoundError(f"{iteration_dir}: checkpoint directory not found")
    lm = generate.load(params, iteration_dir.parent, vocab_size, phase, iteration_dir=iteration_dir)
    end_of_turn = tok.token_to_id(prompts.END_OF_TURN)
    rows, generated = [], 0
    t_gen = time.perf_counter()
    for prog in programs:
        # a prediction longer than the real trace by a quarter cannot match it: stop there
        cap = min(cfg.max_new_tokens, prog["answer_tokens"] + prog["answer_tokens"] // 4 + 16)
        ids = lm.sample(prog["prompt_ids"], max_new_tokens=cap, stop_ids={EOD_ID})[0]
        text = tok.decode(ids, skip_special_tokens=False)
        pred = parse(text)
        m = frame_metrics(pred, prog["real"], prog["result"])
        row = {"id": prog["id"], "predicted": text, "tokens": len(ids), "errors": pred.errors[:3],
               "frames_real": len(prog["real"].frames), "frames_predicted": len(pred.frames)}
        generated += len(ids)
        if prog["output_task"]:
            out_ids = lm.sample(tok.encode(prompts.output_prompt(prog["code"], prog["call"])).ids,
                                max_new_tokens=cfg.output_max_new_tokens,
                                stop_ids={end_of_turn, EOD_ID})[0]
            generated += len(out_ids)
            answer, _ = prompts.output_answer_of(tok, out_ids)
            m["output_exact_match"] = float(answer == prog["result"])
            row.update(output_predicted=answer, output_real=prog["result"])
        m.update(next_frame_metrics(lm, prog))
        row["metrics"] = m
        rows.append(row)
    gen_seconds = time.perf_counter() - t_gen
    summary = {"checkpoint": str(lm.checkpoint), "iteration": lm.iteration,
               "programs": len(rows), **mean_metrics([r["metrics"] for r in rows])}
    for name, (ids, mask) in sorted(streams.items()):
        ppl = perplexity(lm, ids, mask, cfg.ppl_seq_length)
        summary[f"ppl_{name}"] = ppl["ppl"]
        summary[f"nll_{name}"] = ppl["nll"]
    summary["generated_tokens"] = generated
    summary["tokens_per_s"] = generated / gen_seconds if gen_seconds > 0 else 0.0
    summary["seconds"] = time.perf_counter() - t0
    del lm
    return summary, rows


def rl_curve(ckdir: Path, iteration: int, run_state: dict | None = None) -> tuple[list[dict], dict]:
    """The RL phase's reward curve up to the evaluated checkpoint's `iteration` (its steps
    log: every numeric reward_* / success_rate per step) and its figures over those steps, as
    the rl stage sums up its run (stages/rl_figures.summary: reward_first/last/mean, success_rate...).
    Both from the phase's own log, cut at the iteration: steps a run logged after its last
    save are no part of these weights, and metrics/rl.json (outside the storage root, written
    when a run ends) may be of another run or length; its figures were taken when present,
    else the last logged step's under the same names. The counts behind the agent's success
    are the checkpoint's `run_state` totals when it has them: with rl.log_interval > 1 the
    last row at or before the iteration can be of an earlier step (its totals were taken)."""
    rows = [r for r in read_steps(ckdir) if r["step"] <= iteration]
    # the checkpoint's totals are those a row of its step carries: summary takes the last row's
    # (rl_figures.run_totals), and this row has no reward or success of its own to count
    own = [{"step": iteration, **{k: run_state[k] for k in TOTALS}}] \
        if isinstance(run_state, dict) and all(k in run_state for k in TOTALS) else []
    curve = []
    for row in rows:
        point = {k: v for k, v in row.items() if isinstance(v, (int, float)) and
                 (k == "step" or k.startswith("reward") or k == "success_rate")}
        if len(point) > 1:
            curve.append(point)
    final = {k: v for k, v in rl_summary(rows + own).items()
             if isinstance(v, (int, float)) and ("reward" in k or "success" in k)} \
        if curve or own else {}
    return curve, final


def _first_failure(err: BaseException) -> str:
    """The first rank's exception of torch's CheckpointException (a missing shard's
    FileNotFoundError names the file), one line."""
    for exc, _ in getattr(err, "failures", {}).values():
        return f"{type(exc).__name__}: {exc}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def run_fingerprint(ckdir: Path) -> str:
    """The fingerprint the phase's run.json records: the params, data and code of the run that
    made its checkpoints, which with the iteration says which weights a checkpoint holds
    (retrained to the same iteration, a phase's checkpoint has the same path). ValueError
    naming the file when it is missing or unreadable."""
    try:
        fp = json.loads((ckdir / RUN).read_text())["fingerprint"]
        if not isinstance(fp, str) or not fp:
            raise TypeError(f"fingerprint {fp!r} is not a non-empty string")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{ckdir / RUN}: unreadable ({type(err).__name__}: {err}); it records "
                         f"which run made the checkpoints in {ckdir}, which evaluation names "
                         f"with them: rerun the {ckdir.name} stage") from None
    return fp


def tokenizer_mismatch(ckdir: Path, storage: Storage, have: str | None = None) -> str | None:
    """What is wrong when the phase at ``ckdir`` recorded (its run.json's tokenizer_sha256)
    training with another tokenizer than the storage root's (``have``: its manifest's sha256,
    read here when not given): same vocabulary size, other ids, so nothing else would say. None
    when they agree, or when run.json records none (a pack made without the tokenizer stage, a
    run from before the record). The evaluate and export stages both check it."""
    try:
        trained = json.loads((ckdir / RUN).read_text()).get("tokenizer_sha256")
    except (OSError, ValueError, AttributeError):
        return None   # no record: nothing to compare
    if not trained:
        return None
    have = tokenizer_stage.recorded_sha256(storage) if have is None else have
    if trained == have:
        return None
    return (f"{ckdir / RUN}: {ckdir.name} was trained with tokenizer sha256 {trained[:12]}..., "
            f"{storage.path(tokenizer_stage.OUTPUT)} holds {have[:12]}...")


def _finite(obj):
    """JSON has no NaN: a perplexity without tokens is written null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def run(params: Params, *, track: bool = True, metrics_path: str | None = METRICS_PATH,
        report_path: str | None = REPORT) -> dict:
    from torch.distributed.checkpoint import CheckpointException

    from codeworld.config import ConfigError
    from model import checkpoint
    from model.generate import one_thread
    from stages import pack as pack_stage
    from stages.evaluate_report import write_report

    cfg = params.evaluate
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    # A phase that cannot be evaluated is left out, like one without a checkpoint, and said
    # so (summary.json's `unusable`: why); the others are evaluated.
    phases, unusable = [], {}
    for name in cfg.phases:
        ckdir = phase_dir(params, name)
        try:
            # a garbled latest.json, or one naming a folder that is gone: ValueError or
            # FileNotFoundError, each naming the file
            found = checkpoint.latest(ckdir)
            if found is None:
                continue
            if (bad := checkpoint.damage(found[1])) is not None:
                raise ValueError(f"{bad}: {name}'s checkpoint {found[1].name} is damaged (a file "
                                 f"cut or lost since it was saved); rerun the {name} stage (it "
                                 "trains again from its newest intact checkpoint)")
            run_fp = run_fingerprint(ckdir)
        except (ValueError, FileNotFoundError) as err:
            unusable[name] = str(err)
            continue
        # the iteration is fixed here: a rerun of the phase may move it
        phases.append((name, ckdir, found[1], run_fp))
    if not phases and not unusable:
        raise ConfigError(f"evaluate.phases {cfg.phases}: no checkpoint to evaluate (no "
                          f"latest.json under {phase_dir(params, cfg.phases[0]).parent})")
    # One read of the tokenizer's sha256: the phases are checked against the tokenizer loaded.
    have = tokenizer_stage.recorded_sha256(storage)
    tok = tokenizer_stage.load(storage, have)
    for name, ckdir, _, _ in phases:
        if (why := tokenizer_mismatch(ckdir, storage, have)) is not None:
            unusable[name] = (f"{why}: its ids are not this tokenizer's; retrain {name}, or "
                              f"evaluate with the params whose storage root has its tokenizer")
    for name, why in unusable.items():
        log.warning("evaluate: %s left out: %s", name, why)
    phases = [p for p in phases if p[0] not in unusable]
    if not phases:
        raise ConfigError(f"evaluate.phases {cfg.phases}: no checkpoint to evaluate: "
                          + "; ".join(unusable[n] for n in cfg.phases if n in unusable))
    try:
        pack = json.loads((pack_stage.local_dir(params) / pack_stage.MANIFEST).read_text())
        vocab_size = int(pack["vocab_size"])   # what the phases were built with
    except (OSError, ValueError, KeyError):
        vocab_size = tok.get_vocab_size()
    with StageRun("evaluate", params.model_dump(include={"evaluate", "pack", "model"}),
                  params.tracking.experiment, metrics_path, track) as run_:
        counts = {"heldout_traces": 0, "skipped_no_task": 0, "skipped_broken": 0,
                  "skipped_too_long": 0, "skipped_answer_too_long": 0,
                  "skipped_output_too_long": 0, "skipped_output_truncated": 0}
        with run_.timed("select"):
            programs = heldout_programs(params, storage, tok, counts)
            streams = heldout_streams(params, storage, tok, counts)
        if not programs:
            log.warning("evaluate: no held-out program fits max_program_tokens=%d (prompt + "
                        "trace) and max_new_tokens=%d (trace) (%s)", cfg.max_program_tokens,
                        cfg.max_new_tokens, counts)
        results: dict[str, dict] = {}
        predictions: dict[str, list[dict]] = {}
        out = storage.sub(OUTPUT)
        for name, ckdir, iteration_dir, run_fp in phases:
            log.info("evaluate: %s (%s)", name, iteration_dir)
            try:
                with one_thread():
                    summary, rows = evaluate_phase(params, name, iteration_dir, vocab_size, tok,
                                                   programs, streams)
            except FileNotFoundError as err:   # removed since listed: that phase is retraining
                log.warning("evaluate: %s skipped, its checkpoint is gone: %s", name, err)
                continue
            except CheckpointException as err:
                # a file lost that no list of the checkpoint's names (saved before the lists
                # were kept): torch says which (a BaseException, never a traceback here)
                unusable[name] = f"{iteration_dir}: unreadable checkpoint: {_first_failure(err)}"
                log.warning("evaluate: %s left out: %s", name, unusable[name])
                continue
            # what the figures are of: with the iteration, the run that made the checkpoint (a
            # phase retrained to the same iteration has the same path, not the same weights)
            summary["run_fingerprint"] = run_fp
            if name == "rl":
                try:
                    state = checkpoint.run_state(iteration_dir)
                except ValueError as err:   # garbled: the figures of a checkpoint without one
                    log.warning("evaluate: rl's run totals unreadable, its agent figures are "
                                "the last logged step's: %s", err)
                    state = None
                curve, final = rl_curve(ckdir, summary["iteration"], state)
                summary.update({f"rl_{k}": v for k, v in final.items()})
                summary["rl_curve"] = curve
            summary["loss_curve"] = [{"step": r["step"], "loss": r["loss"]}
                                     for r in read_steps(ckdir) if r.get("loss") is not None
                                     and r["step"] <= summary["iteration"]]
            log.info("evaluate: %s done in %.1f s (%d tokens generated, %.0f tokens/s)", name,
                     summary["seconds"], summary["generated_tokens"], summary["tokens_per_s"])
            results[name] = summary
            predictions[name] = rows
            out.write_bytes(f"{name}.jsonl", b"".join(dumps(r) + b"\n" for r in rows))
        fp = fingerprint(CODE, "evaluate", 1, cfg.model_dump(), {
            n: [str(r["checkpoint"]), r["iteration"], r["run_fingerprint"]]
            for n, r in results.items()})
        missing = [n for n in cfg.phases if n not in results]
        # predictions of an earlier run would pass for this one's: those of a phase not
        # evaluated now go, listed in evaluate.phases or no longer
        for f in out.list():
            if f.endswith(".jsonl") and f[:-len(".jsonl")] not in results:
                out.remove(f)
        doc = _finite({
            "name": OUTPUT, "fingerprint": fp, "counts": counts, "missing": missing,
            "unusable": unusable,
            "programs": [p["id"] for p in programs],
            # timings are in the metrics, not here: the same inputs give the same file
            "phases": {n: {k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")}
                       for n, r in results.items()}})
        summary_bytes = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
        out.write_bytes("summary.json", summary_bytes)
        if report_path:
            with run_.timed("report"):
                files = write_report(Path(report_path), doc, programs, predictions)
            if track:
                import mlflow

                for f in files:
                    mlflow.log_artifact(str(f), "report")
        flat = dict(counts)
        for n, r in results.items():
            for k, v in r.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    flat[f"{n}.{k}"] = round(v, 6)
        flat["phases_evaluated"] = len(results)
        flat["phases_unusable"] = len(unusable)
        run_.log(**flat)
        return {"name": OUTPUT, "fingerprint": fp, "records": len(programs),
                "phases": list(results),
                "summary_sha256": hashlib.sha256(summary_bytes).hexdigest()}
