"""Stage `export`: a phase's final checkpoint as a Hugging Face model folder.

The trained model leaves Megatron's sharded checkpoint format for the one the rest of the field
loads: `LlamaForCausalLM` weights in safetensors (model/hf_llama.py maps the names), its config,
the tokenizer (our tokenizer.json with its special tokens named), a generation config that stops
at end-of-text, and a model card with the lineage and the held-out evaluation of that phase.

Nothing is published unchecked: the folder is written to a temporary directory, loaded back with
transformers (`AutoModelForCausalLM`, `AutoTokenizer`) and compared with the Megatron model on
held-out trace programs (never trained on): the tokenizer must give the same ids, the logits
agree within `tolerance_*`, greedy continuations must be the same tokens (or part at a near
tie, within the tolerance). Then the files
go to `export/` under the storage root, each written atomically, `codeworld.json` (the
provenance and every file's sha256) last, so a reader that finds it finds a whole export. A
rerun with the same checkpoint, params and code finds that file and does nothing.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from codeworld.code import Code
from codeworld.config import ConfigError, Params
from codeworld.shards import fingerprint
from codeworld.storage import Storage, file_sha256
from codeworld.tokens import EOD_ID, END_OF_TEXT, PAD, PAD_ID, SPECIAL_TOKENS
from codeworld.tracking import StageRun
from stages import tokenizer as tokenizer_stage
from stages.train_phase import RUN, phase_dir

CODE = Code(("stages.export",), skip=("model.launch",))
OUTPUT = "export"
MANIFEST = "codeworld.json"
METRICS_PATH = "metrics/export.json"
log = logging.getLogger(__name__)


class ExportCheckFailed(RuntimeError):
    """The exported model does not compute what the checkpoint computes."""


def build_folder(params: Params, lm, tok, dest: Path, card: str) -> int:
    """Write the Hugging Face folder of a loaded model into `dest`; returns its parameters."""
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from model.hf_llama import config_dict, llama_state_dict

    vocab = tok.get_vocab_size()
    weights = llama_state_dict(lm.model.state_dict(), params.model, vocab)
    dtype = next(iter(weights.values())).dtype
    special = dict(bos_token_id=None, eos_token_id=EOD_ID, pad_token_id=PAD_ID)
    config = LlamaConfig(**config_dict(params.model, vocab, dtype, lm.model.config.layernorm_epsilon,
                                       special))
    with torch.device("meta"):       # no random init of weights that are replaced at once
        model = LlamaForCausalLM(config)
    model.load_state_dict(weights, strict=True, assign=True)
    model.generation_config = GenerationConfig(**special, do_sample=False)
    model.save_pretrained(dest)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.to_str()), eos_token=END_OF_TEXT, pad_token=PAD,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (END_OF_TEXT, PAD)],
        model_max_length=params.model.max_position_embeddings)
    fast.save_pretrained(dest)
    (dest / "README.md").write_text(card)
    return sum(w.numel() for w in weights.values())


def check_folder(folder: Path, lm, tok, programs: list[dict], cfg) -> dict:
    """Load the folder with transformers alone and compare it with the Megatron model.

    Two implementations of one function in floating point agree to rounding, not to the bit:
    the tolerance bounds the logits' difference, and greedy continuations must be the same
    tokens, or part only at a near tie (the two tokens' logits within the tolerance), where
    rounding may pick either."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    device = next(lm.model.parameters()).device
    hf.to(device)
    dtype = next(hf.parameters()).dtype
    tolerance = cfg.tolerance_fp32 if dtype == torch.float32 else cfg.tolerance_bf16
    stats = {"programs": len(programs), "tokenizer_equal": 0, "greedy_equal": 0,
             "greedy_near_ties": 0, "logits_max_abs_diff": 0.0, "argmax_agreement": 0.0}
    agree = total = 0
    problems = []
    for prog in programs:
        text = tok.decode(prog["prompt_ids"] + prog["answer_ids"], skip_special_tokens=False)
        ids = tok.encode(text).ids
        stats["tokenizer_equal"] += hf_tok.encode(text, add_special_tokens=False) == ids
        row = torch.tensor([ids])
        with torch.no_grad():
            ours = lm.logits(row)
            theirs = hf(row.to(device)).logits.float()
        stats["logits_max_abs_diff"] = max(stats["logits_max_abs_diff"],
                                           (ours - theirs).abs().max().item())
        agree += (ours.argmax(-1) == theirs.argmax(-1)).sum().item()
        total += row.numel()
        prompt = prog["prompt_ids"]
        mine = lm.sample(prompt, max_new_tokens=cfg.greedy_tokens, stop_ids={EOD_ID})[0]
        with torch.no_grad():
            gen = hf.generate(torch.tensor([prompt], device=device), do_sample=False,
                              max_new_tokens=cfg.greedy_tokens)[0, len(prompt):].tolist()
        if gen == mine:
            stats["greedy_equal"] += 1
            continue
        at = next(k for k, (a, b) in enumerate(zip(gen + [None], mine + [None])) if a != b)
        if at < min(len(gen), len(mine)):
            step = lm.logits(torch.tensor([prompt + mine[:at]]))[0, -1]
            if abs(step[mine[at]] - step[gen[at]]).item() <= tolerance:
                stats["greedy_near_ties"] += 1
                continue
        problems.append(f"greedy continuation of {prog['id']} parts at token {at} "
                        f"(ours {mine[at:at + 3]}, theirs {gen[at:at + 3]})")
    stats["argmax_agreement"] = agree / max(total, 1)
    stats["dtype"], stats["tolerance"] = str(dtype).removeprefix("torch."), tolerance
    if stats["tokenizer_equal"] != len(programs):
        problems.append(f"the exported tokenizer encodes {len(programs) - stats['tokenizer_equal']}"
                        f" of {len(programs)} texts otherwise")
    if stats["logits_max_abs_diff"] > tolerance:
        problems.append(f"logits differ by up to {stats['logits_max_abs_diff']:.3g} "
                        f"(tolerance {tolerance:g} for {stats['dtype']})")
    if problems:
        raise ExportCheckFailed(f"{folder}: the export does not match the checkpoint: "
                                + "; ".join(problems[:4]))
    return stats


def model_card(params: Params, phase: str, iteration: int, lineage: list[dict],
               evaluation: dict | None) -> str:
    m = params.model
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [code, code-world-model, execution-traces, codeworld]", "---", "",
        f"# codeworld {phase} model", "",
        "A Code World Model trained by the codeworld pipeline (Megatron-Core), exported to the",
        "Hugging Face Llama layout: RoPE, SwiGLU, RMSNorm, grouped-query attention, no biases.", "",
        "| | |", "|---|---|",
        f"| phase | {phase}, iteration {iteration} |",
        f"| layers / hidden / heads / kv heads / ffn | {m.num_layers} / {m.hidden_size} / "
        f"{m.num_attention_heads} / {m.num_query_groups} / {m.ffn_hidden_size} |",
        f"| rope theta / max positions | {m.rotary_base} / {m.max_position_embeddings} |",
        "", "## Lineage", "",
        "Each phase starts from the one below it (fingerprint: params, data and code of the phase).", "",
    ]
    lines += [f"- `{r['phase']}` iteration {r['iteration']}, fingerprint `{r['fingerprint'][:16]}`"
              for r in lineage]
    lines += ["", "## Held-out evaluation", ""]
    if evaluation:
        lines += ["Programs never trained on (`stages/evaluate.py`), greedy decoding:", "",
                  "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in sorted(evaluation.items())
                  if isinstance(v, float)]
    else:
        lines.append("No held-out evaluation of this checkpoint on record (the evaluate "
                     "stage's summary).")
    lines += [
        "", "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(FOLDER)",
        "model = AutoModelForCausalLM.from_pretrained(FOLDER)",
        "```", "",
        "CWM's trace tokens (`<|trace_context_start|>`, `<|frame_sep|>`, ...), the agent's tool",
        "markers and the turn markers are single special tokens; prompts are built as",
        "`codeworld/prompts.py` builds them (a trace prompt: `<|trace_context_start|>` + source",
        "with a `def main():  # << START_OF_TRACE` entry point + `<|frame_sep|>`).", ""]
    return "\n".join(lines)


def phase_record(ckdir: Path, phase: str | None = None) -> dict:
    """A phase directory as the lineage names it: phase (by default its run.json's, else the
    directory's name), latest iteration, run fingerprint."""
    from model import checkpoint

    run = json.loads((ckdir / RUN).read_text()) if (ckdir / RUN).exists() else {}
    found = checkpoint.latest(ckdir)
    return {"phase": phase or run.get("phase") or ckdir.name,
            "iteration": found[0] if found else None, "fingerprint": run.get("fingerprint", "")}


def lineage(params: Params, phase: str) -> list[dict]:
    """The phase, then the one it started from, and so on (params' init_from)."""
    chain, cur = [], phase
    while cur:
        chain.append(phase_record(phase_dir(params, cur), cur))
        cur = getattr(getattr(params, cur, None), "init_from", None)
    return chain


def evaluation_of(storage: Storage, phase: str, iteration_dir: Path) -> dict | None:
    """The evaluate stage's figures of ``phase`` when they are of the checkpoint at
    ``iteration_dir``: the same folder, iteration and run (the fingerprint of the phase's
    run.json; a phase retrained to the same iteration has the same folder, other weights). A
    phase retrained since its evaluation, or a summary that does not say which run it
    evaluated, has none on record yet."""
    from model.checkpoint import iteration_of

    rel = "evaluate/summary.json"
    if not storage.exists(rel):
        return None
    try:
        evaluation = json.loads(storage.read_bytes(rel))["phases"].get(phase)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{storage.path(rel)}: not an evaluate summary ({err!r}); rerun the "
                          f"evaluate stage") from None
    if not isinstance(evaluation, dict):
        return None
    iteration_dir = Path(iteration_dir)
    try:
        run_fp = json.loads((iteration_dir.parent / RUN).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        run_fp = None   # no record of the run: no evaluation can be said to be of it
    try:
        iteration = iteration_of(iteration_dir)
    except ValueError:
        iteration = None   # not an iter_N folder: no checkpoint the evaluate stage names
    have = (str(iteration_dir.resolve()), iteration, run_fp)
    got = (str(Path(str(evaluation.get("checkpoint"))).resolve()), evaluation.get("iteration"),
           evaluation.get("run_fingerprint"))
    if None in have or got != have:
        log.warning("export: %s's evaluation is of %s (iteration %s, run %s), not of %s "
                    "(iteration %s, run %s): the card leaves it out", phase, got[0], got[1],
                    str(got[2])[:12], have[0], have[1], str(have[2])[:12])
        return None
    return evaluation


def run(params: Params, *, track: bool = True, metrics_path: str | None = METRICS_PATH) -> dict:
    """The stage: export.phase's latest checkpoint to `export/` under the storage root, its
    card with the phase chain and the evaluate stage's held-out figures of that phase."""
    from model import checkpoint

    phase = params.export.phase
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    ckdir = phase_dir(params, phase)
    found = checkpoint.latest(ckdir)
    if found is None:
        raise ConfigError(f"export.phase {phase!r}: no checkpoint to export (no latest.json "
                          f"in {ckdir}); train that phase first")
    evaluation = evaluation_of(storage, phase, found[1])
    return export(params, found, storage.sub(OUTPUT), lineage(params, phase), evaluation,
                  track=track, metrics_path=metrics_path)


def earlier_export(out: Storage) -> dict:
    """The manifest an earlier export left in ``out`` (a pending one too: a run killed while
    publishing), ``{"files": {}}`` for an empty or missing folder. ConfigError for a folder
    that holds files no export wrote: publishing replaces what is there, and must not delete a
    user's files or mix an export into them (``codeworld export --out`` takes any folder)."""
    if out.exists(MANIFEST):
        try:
            done = json.loads(out.read_bytes(MANIFEST))
            files = done["files"]
            if not isinstance(files, dict):
                raise TypeError("'files' is not an object")
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{out.path(MANIFEST)}: not an export manifest ({err}); remove "
                              f"it, or export to another folder") from None
        return done
    strangers = out.list()
    if strangers:
        shown = ", ".join(strangers[:5]) + (", ..." if len(strangers) > 5 else "")
        raise ConfigError(f"export: {out.path()} holds files no codeworld export wrote "
                          f"({shown}) and would lose them: export to an empty or new folder")
    return {"files": {}}


def check_tokenizer(ckdir: Path, storage: Storage) -> None:
    """ConfigError when the phase at ``ckdir`` recorded (run.json) training with another
    tokenizer than the storage root's: the export would ship ids the weights never learned,
    and its check, which runs both sides on the same tokenizer, could not tell (the check is
    the evaluate stage's, stages/evaluate.tokenizer_mismatch)."""
    from stages.evaluate import tokenizer_mismatch

    if (why := tokenizer_mismatch(ckdir, storage)) is not None:
        raise ConfigError(f"export: {why}: export with the params whose storage root has the "
                          f"tokenizer it was trained with")


def export(params: Params, found: tuple[int, Path], out: Storage, chain: list[dict],
           evaluation: dict | None = None, *, track: bool = False,
           metrics_path: str | None = None) -> dict:
    """A checkpoint (`found`: the iteration and its directory, checkpoint.latest's answer) of
    the phase `chain` starts with, to the folder `out`, checked on the storage root's held-out
    traces with its tokenizer (the stage, and `codeworld export` for a checkpoint trained by
    hand)."""
    from model import generate
    from stages.evaluate import heldout_programs

    cfg = params.export
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    iteration, iteration_dir = found
    phase = chain[0]["phase"]
    # the card prints the evaluation's figures: new figures are a new export
    fp = fingerprint(CODE, OUTPUT, 1, cfg.model_dump(), params.model.model_dump(), chain,
                     evaluation)
    done = earlier_export(out)
    if done.get("fingerprint") == fp and all(
            out.exists(f) and out.sha256(f) == h for f, h in done["files"].items()):
        log.info("export: %s is up to date (%s)", out.path(), fp[:12])
        return {"name": OUTPUT, "fingerprint": fp, "records": len(done["files"]),
                "files": done["files"]}
    check_tokenizer(iteration_dir.parent, storage)
    tok = tokenizer_stage.load(storage)
    with StageRun(OUTPUT, params.model_dump(include={"export", "model"}),
                  params.tracking.experiment, metrics_path, track) as run_, \
            tempfile.TemporaryDirectory(prefix="codeworld-export-") as tmp:
        counts = {"heldout_traces": 0, "skipped_no_task": 0, "skipped_broken": 0,
                  "skipped_too_long": 0}
        draw = params.model_copy(update={"evaluate": params.evaluate.model_copy(
            update={"max_programs": cfg.check_programs})})
        programs = heldout_programs(draw, storage, tok, counts)
        if not programs:
            raise ConfigError(f"export: no held-out trace program to check the export with "
                              f"({counts}); raise evaluate.max_program_tokens")
        folder = Path(tmp) / OUTPUT
        with run_.timed("write"):
            lm = generate.load(params, iteration_dir.parent, tok.get_vocab_size(), phase,
                               iteration_dir)
            card = model_card(params, phase, iteration, chain, evaluation)
            n_params = build_folder(params, lm, tok, folder, card)
        with run_.timed("check"):
            stats = check_folder(folder, lm, tok, programs, cfg)
        files = sorted(p.name for p in folder.iterdir())
        manifest = {"name": OUTPUT, "fingerprint": fp, "phase": phase, "iteration": iteration,
                    "checkpoint": str(iteration_dir), "lineage": chain,
                    "files": {f: file_sha256(folder / f) for f in files},
                    # what was checked, not the figures: those vary with rounding (they
                    # are in the metrics), and the same checkpoint must give the same bytes
                    "check": {"greedy_tokens": cfg.greedy_tokens,
                              **{k: stats[k] for k in ("programs", "dtype", "tolerance")}}}
        # From here until the final manifest lands the folder is not whole: a pending one
        # (no fingerprint, so never up to date) names every file an export may have left
        # there, so that a rerun after a kill still knows them for its own.
        ours = sorted(set(done["files"]) | set(files))
        out.write_bytes(MANIFEST, json.dumps({"name": OUTPUT, "pending": True, "files": {
            f: None for f in ours}}, indent=1, sort_keys=True).encode() + b"\n")
        for f in set(done["files"]) - set(files):
            out.remove(f)    # a file of an earlier export that this one no longer writes
        for f in files:
            out.upload(folder / f, f)
        out.write_bytes(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")
        run_.log(parameters=n_params, bytes=sum((folder / f).stat().st_size for f in files),
                 **{k: v for k, v in stats.items() if isinstance(v, (int, float))})
        log.info("export: %s iteration %d -> %s (%d parameters; logits within %.2g, greedy "
                 "%d/%d equal)", phase, iteration, out.path(), n_params,
                 stats["logits_max_abs_diff"], stats["greedy_equal"], stats["programs"])
    return {"name": OUTPUT, "fingerprint": fp, "records": len(files), **stats,
            "files": manifest["files"]}
