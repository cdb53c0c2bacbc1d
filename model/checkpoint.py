"""Checkpoints with megatron.core.dist_checkpointing: every rank writes its shards; a load
reshards to the current TP/PP/DP layout.

Atomic: a checkpoint is written to `iter_N.tmp/`, renamed to `iter_N/` once every rank has
finished, and only then named in `latest.json` (written by rename too). A run killed while
saving leaves a `.tmp` directory that the next save removes; `latest.json` always names a
complete checkpoint. Each checkpoint lists its files and their sizes (`codeworld_files.json`,
written before the rename): a file cut or lost since is found before any rank loads it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

LATEST = "latest.json"
FILES = "codeworld_files.json"   # in each checkpoint: {relative path: bytes} at save time
# in each checkpoint: {"distributed_optimizer": bool}, the format of its optimizer state
OPTIMIZER = "codeworld_optimizer.json"
# A phase's own figures at the saved step that its step log cannot rebuild (rows are written
# every log_interval steps only): RL's running totals. Resumed with the weights.
RUN_STATE = "codeworld_run_state.json"
# The distributed optimizer's default sharding fails in megatron-core 0.16 ("flattened_range is
# not supported"); the fully reshardable format also loads under another layout.
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _rank() -> int:
    return torch.distributed.get_rank()


def _barrier() -> None:
    torch.distributed.barrier()


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def sharded_state_dict(chunks, optimizer=None, scheduler=None, iteration: int = 0,
                       is_loading: bool = False) -> dict:
    sd: dict = {}
    model_sd: dict = {}
    for i, chunk in enumerate(chunks):
        model_sd[_model_key(i, len(chunks))] = chunk.module.sharded_state_dict()
    sd.update(model_sd)
    if optimizer is not None:
        # nested per chunk: virtual pipeline chunks number their layers from 0 each, so a flat
        # dict would let one chunk's keys hide the other's
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                       metadata=OPTIM_METADATA)
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    sd["iteration"] = iteration
    return sd


def iteration_of(path: Path) -> int:
    """The iteration of a checkpoint folder `iter_N`."""
    return int(path.name[len("iter_"):])


def complete(root: Path) -> list[Path]:
    """The complete checkpoints in `root`, oldest first: `iter_N/` is only ever renamed from
    `iter_N.tmp/` once every rank has written it."""
    return sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))


def has_checkpoints(root: Path) -> bool:
    return (root / LATEST).exists() or bool(complete(root))


def latest(root: Path) -> tuple[int, Path] | None:
    """(iteration, folder) of the checkpoint `latest.json` names; without latest.json, the
    newest complete one (a save killed between its rename and latest.json, or the file
    deleted by hand: a restart from step 0 would prune those checkpoints); None when none."""
    try:
        info = json.loads((root / LATEST).read_text())
    except FileNotFoundError:
        found = complete(root)
        if not found:
            return None
        return iteration_of(found[-1]), found[-1]
    except ValueError as err:
        raise ValueError(f"{root / LATEST}: not valid JSON ({err})") from None
    try:
        path, iteration = root / info["dir"], int(info["iteration"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{root / LATEST}: needs {{\"iteration\": N, \"dir\": \"iter_N\"}}, "
                         f"got {json.dumps(info)[:200]} ({type(err).__name__}: {err})") from None
    if not path.is_dir():
        raise FileNotFoundError(f"{root / LATEST} names {info['dir']}, which does not exist")
    return iteration, path


def damage(path: Path) -> str | None:
    """What is wrong with the checkpoint folder `path` against the file list it was saved
    with: a file missing or of another size (sizes, not hashes: a start must not read every
    shard twice). None when intact, or saved before the lists were kept."""
    try:
        listing = json.loads((path / FILES).read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:
        return f"{path / FILES}: not valid JSON ({err})"
    for name, size in sorted(listing.items()):
        try:
            got = (path / name).stat().st_size
        except FileNotFoundError:
            return f"{path / name}: missing"
        if got != size:
            return f"{path / name}: {got} bytes, {size} when saved"
    return None


def point_latest(root: Path, path: Path) -> None:
    """Name the checkpoint folder `path` (of root) in latest.json, atomically."""
    body = json.dumps({"iteration": iteration_of(path), "dir": path.name}) + "\n"
    (root / f".{LATEST}.tmp").write_text(body)
    os.replace(root / f".{LATEST}.tmp", root / LATEST)


def save(root: Path, iteration: int, chunks, optimizer, scheduler, keep: int = 2,
         run_state: dict | None = None) -> Path:
    """The checkpoint of `iteration`; `run_state` (JSON) saved beside the weights, see RUN_STATE."""
    from megatron.core import dist_checkpointing

    final = root / f"iter_{iteration:07d}"
    tmp = root / f"iter_{iteration:07d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / OPTIMIZER).write_text(json.dumps({"distributed_optimizer": distributed(optimizer)}) + "\n")
        if run_state is not None:
            (tmp / RUN_STATE).write_text(json.dumps(run_state, sort_keys=True) + "\n")
    _barrier()
    dist_checkpointing.save(sharded_state_dict(chunks, optimizer, scheduler, iteration), str(tmp))
    _barrier()
    if _rank() == 0:
        publish(root, iteration, keep)
    _barrier()
    return final


def publish(root: Path, iteration: int, keep: int = 2) -> Path:
    """Rank 0, once every rank has written `iter_N.tmp/`: rename it to `iter_N/`, name it in
    `latest.json`, keep the newest `keep` complete checkpoints, and remove what saves killed
    midway left (a rerun with another interval or step count never saves their iteration)."""
    final = root / f"iter_{iteration:07d}"
    tmp = root / f"iter_{iteration:07d}.tmp"
    listing = {p.relative_to(tmp).as_posix(): p.stat().st_size
               for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != FILES}
    (tmp / FILES).write_text(json.dumps(listing, sort_keys=True) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    point_latest(root, final)
    for old in complete(root)[:-keep] if keep else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("iter_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load(path: Path, chunks, optimizer=None, scheduler=None) -> int:
    """Load a checkpoint into this layout's chunks (and optimizer and scheduler when given).
    Returns the checkpoint's iteration."""
    from megatron.core import dist_checkpointing

    if optimizer is not None:
        check_optimizer_format(path, optimizer)
        _prepare_optimizer_for_load(optimizer)
    request = sharded_state_dict(chunks, optimizer, scheduler, 0, is_loading=True)
    state = dist_checkpointing.load(request, str(path))
    for i, chunk in enumerate(chunks):
        chunk.module.load_state_dict(state[_model_key(i, len(chunks))])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["iteration"])


def run_state(path: Path) -> dict | None:
    """What save's `run_state` held for checkpoint `path`; None when it was saved without."""
    try:
        return json.loads((path / RUN_STATE).read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise ValueError(f"{path / RUN_STATE}: not valid JSON ({err})") from None


def distributed(optimizer) -> bool:
    """Whether the optimizer shards its state over data parallel (parallel.distributed_optimizer)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer)
               for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def check_optimizer_format(path: Path, optimizer) -> None:
    """A distributed optimizer's state and a plain one's are other formats, which Megatron does
    not convert: its load failed with "KeyError: 'pre_wd_mult'". Checkpoints saved before the
    format was recorded are not checked."""
    try:
        saved = json.loads((path / OPTIMIZER).read_text())["distributed_optimizer"]
    except FileNotFoundError:
        return
    now = distributed(optimizer)
    if saved != now:
        raise ValueError(
            f"{path}: saved with parallel.distributed_optimizer={json.dumps(saved)}; this run has "
            f"{json.dumps(now)}: the optimizer state is in the other format. Resume with "
            f"distributed_optimizer={json.dumps(saved)} (the next phase, which starts a fresh "
            f"optimizer, may change it)")


def _prepare_optimizer_for_load(optimizer) -> None:
    """A fresh distributed optimizer over torch's Adam has no state tensors to load into yet."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None:
            init()
