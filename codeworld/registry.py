"""Register the final checkpoint in the MLflow model registry with its lineage.

The final checkpoint is the last training phase (dvc.yaml order) whose checkpoint exists. It is
logged as an artifact of a `register` run (a child of the pipeline run when there is one), with
the tokenizer and the params it was trained with (and, when the `export` stage exported that
checkpoint, its Hugging Face folder as artifact `hf`, tag `export.hf`), and registered as a new
version of the model (`tracking.registered_model`, default `codeworld`) from
`runs:/<run>/checkpoint`: an artifact URI works with a local store and an MLflow server alike.
The tokenizer and the export are read where their stages write them, under the storage root (on
S3 with an S3 root, where the local data/tokenizer holds only a pinned manifest); a checkpoint
is not registered without the tokenizer its run.json records training with (tag
`tokenizer.sha256`). The version's tags carry the lineage:
the phase chain with each phase's fingerprint and parent, the git commit, and dvc.lock's md5 of
every stage output from the raw corpus to the checkpoint. Registering the same checkpoint
twice (same fingerprint) returns the existing version.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import yaml

from codeworld.config import PHASES, Params
from codeworld.storage import Storage
from codeworld.tracking import PARENT_ENV, repo_root, tracking_uri


class RegistryError(RuntimeError):
    pass


def final_phase(params: Params) -> tuple[str, Path]:
    from model import checkpoint
    from stages.train_phase import phase_dir

    phases = (*PHASES, "rl") if getattr(params, "rl", None) is not None else PHASES
    for phase in reversed(phases):
        d = phase_dir(params, phase)
        if d.exists() and checkpoint.latest(d) is not None:
            return phase, d
    raise RegistryError("no training phase has a checkpoint yet (run the pipeline first)")


def lineage(params: Params, phase: str, root: Path) -> dict[str, str]:
    """Tags: the phase chain back to pretrain, and dvc.lock's outs of every stage."""
    from stages.export import lineage as phase_chain

    tags: dict[str, str] = {"phase": phase}
    chain = phase_chain(params, phase)
    for r in chain:
        tags[f"lineage.{r['phase']}.fingerprint"] = r["fingerprint"]
        tags[f"lineage.{r['phase']}.iteration"] = "" if r["iteration"] is None else str(r["iteration"])
    tags["lineage.chain"] = " <- ".join(r["phase"] for r in chain)
    lock = root / "dvc.lock"
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for name, st in stages.items():
            for out in st.get("outs") or []:
                if "md5" in out:
                    tags[f"dvc.{name}.{out['path']}"] = out["md5"]
    return tags


def _existing(client, name: str, fingerprint: str, iteration: int):
    """The version registered for this checkpoint (run fingerprint and iteration: a run
    registered while training, or before a resume, has a later checkpoint still to come).
    An error of the tracking server is raised, not taken as "none": that registered twice."""
    if "'" not in name:
        quoted = f"'{name}'"
    elif '"' not in name:
        quoted = f'"{name}"'
    else:
        raise RegistryError(f"registered model name {name!r}: holds both quote characters")
    for v in client.search_model_versions(f"name = {quoted}"):
        if (v.tags.get("checkpoint.fingerprint") == fingerprint
                and v.tags.get("checkpoint.iteration") == str(iteration)):
            return v
    return None


def export_of(out: Storage | Path, phase: str, iteration: int, fingerprint: str) -> dict | None:
    """The manifest of the export in `out` (the `export` stage writes it last) when that is a
    whole export of that checkpoint: the phase's run (fingerprint) and iteration, not an export
    of an earlier training run. None when there is none; a storage failure is raised."""
    if not isinstance(out, Storage):
        out = Storage(str(out))
    from stages.export import MANIFEST

    try:
        manifest = json.loads(out.read_bytes(MANIFEST))
        exported = manifest["lineage"][0]
        files = manifest["files"]
    except (FileNotFoundError, ValueError, KeyError, IndexError, TypeError):
        return None   # none, a pending one (an export being published), or not an export's
    if not (isinstance(files, dict) and all(isinstance(h, str) for h in files.values())):
        return None
    if exported != {"phase": phase, "iteration": iteration, "fingerprint": fingerprint}:
        return None
    return manifest


def trained_tokenizer(storage: Storage, ckdir: Path) -> tuple[bytes, str]:
    """The storage root's tokenizer.json (where the tokenizer stage writes it) and its sha256,
    checked against the one the phase at `ckdir` recorded training with (run.json), or for a
    run that recorded none against the tokenizer's manifest. RegistryError, naming where it
    was looked for, when there is none or it is another."""
    from stages import tokenizer as tokenizer_stage
    from stages.train_phase import RUN

    out = storage.sub(tokenizer_stage.OUTPUT)
    where = out.path(tokenizer_stage.FILE)
    try:
        body = out.read_bytes(tokenizer_stage.FILE)
    except FileNotFoundError:
        raise RegistryError(f"{where}: no tokenizer there (the tokenizer stage writes it under "
                            f"storage.root); the checkpoint is not registered without the "
                            f"tokenizer it was trained with") from None
    have = hashlib.sha256(body).hexdigest()
    want = json.loads((ckdir / RUN).read_text()).get("tokenizer_sha256")
    what = f"{ckdir / RUN} records training with"
    if not want:
        try:
            want, what = tokenizer_stage.recorded_sha256(storage), "its manifest records"
        except FileNotFoundError:
            return body, have   # no record of either kind to check it against
        except ValueError as err:
            raise RegistryError(str(err)) from None
    if have != want:
        raise RegistryError(f"{where}: sha256 {have[:12]}..., {what} {want[:12]}...: not the "
                            f"tokenizer of this checkpoint (retrained since, or another storage "
                            f"root); the checkpoint is not registered with it")
    return body, have


def register_final(params: Params, name: str | None = None) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    from model import checkpoint
    from stages.train_phase import PARAMS, RUN

    root = repo_root()
    name = name or params.tracking.registered_model
    phase, d = final_phase(params)
    iteration, ckpt = checkpoint.latest(d)
    fp = json.loads((d / RUN).read_text())["fingerprint"]
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    if (found := _existing(client, name, fp, iteration)) is not None:
        return {"name": name, "version": found.version, "phase": phase, "new": False,
                "source": found.source}
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    tok, tok_sha = trained_tokenizer(storage, d)   # before the run: none is left behind without it
    tags = lineage(params, phase, root)
    tags.update({"checkpoint.fingerprint": fp, "checkpoint.iteration": str(iteration),
                 "tokenizer.sha256": tok_sha})
    run_tags = {"codeworld.stage": "register", **{k: v[:5000] for k, v in tags.items()}}
    if parent := os.environ.get(PARENT_ENV):
        run_tags["mlflow.parentRunId"] = parent
    # The client API, not mlflow.start_run: the flow calling this has the pipeline run active
    # in its process, and a fluent run would have to nest under it.
    from codeworld.tracking import git_commit

    if commit := git_commit():
        run_tags["git.commit"] = commit
    exp = client.get_experiment_by_name(params.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(params.tracking.experiment)
    run_id = client.create_run(exp_id, tags={**run_tags, "mlflow.runName": "register"},
                               run_name="register").info.run_id
    status = "FAILED"
    try:
        from stages import export as export_stage
        from stages import tokenizer as tokenizer_stage

        client.log_artifacts(run_id, str(ckpt), "checkpoint")
        with tempfile.TemporaryDirectory(prefix="codeworld-register-") as tmp:
            (Path(tmp) / tokenizer_stage.FILE).write_bytes(tok)
            client.log_artifact(run_id, str(Path(tmp) / tokenizer_stage.FILE), "checkpoint")
        if (d / PARAMS).exists():
            client.log_artifact(run_id, str(d / PARAMS), "checkpoint")
        out = storage.sub(export_stage.OUTPUT)
        if (manifest := export_of(out, phase, iteration, fp)) is not None:
            # the `export` stage's Hugging Face folder of this very checkpoint: the files its
            # manifest names, each checked against its sha256 on the way
            with tempfile.TemporaryDirectory(prefix="codeworld-register-") as tmp:
                for f, sha in manifest["files"].items():
                    out.download(f, Path(tmp) / f, sha256=sha)
                (Path(tmp) / export_stage.MANIFEST).write_text(
                    json.dumps(manifest, indent=1, sort_keys=True) + "\n")
                client.log_artifacts(run_id, tmp, "hf")
            tags["export.hf"] = f"runs:/{run_id}/hf"
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    try:
        client.create_registered_model(name, description="codeworld checkpoints (final phase of each pipeline run)")
    except Exception:   # already registered
        pass
    version = client.create_model_version(name, f"runs:/{run_id}/checkpoint", run_id=run_id,
                                          tags={k: v[:5000] for k, v in tags.items()},
                                          description=f"{phase} iteration {iteration}")
    return {"name": name, "version": version.version, "phase": phase, "new": True,
            "source": version.source, "run_id": run_id}
