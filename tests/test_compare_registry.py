"""`codeworld compare` and the model registry, against a real MLflow tracking server."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from codeworld.config import load_params
from codeworld.storage import Storage

REPO = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, experiment: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "data")},
                                    "tracking": {"experiment": experiment,
                                                 "registered_model": f"{experiment}-model"}}))
    return path


def _fake_pipeline(experiment: str, losses: dict[str, list[float]]) -> str:
    """A pipeline run with one child run per phase, each with a per-step loss history."""
    import mlflow

    from codeworld.tracking import PARENT_ENV, StageRun, start_run

    parent = start_run("pipeline", experiment, {}).info.run_id
    mlflow.end_run()
    import os

    os.environ[PARENT_ENV] = parent
    try:
        for phase, curve in losses.items():
            with StageRun(phase, {}, experiment, None, True) as run:
                client = mlflow.tracking.MlflowClient()
                for i, v in enumerate(curve, 1):
                    client.log_metric(run.run_id, "loss", v, step=i)
                run.log(final_loss=curve[-1], steps=len(curve))
    finally:
        del os.environ[PARENT_ENV]
    return parent


def _cli(args: list[str], env_uri: str, cwd: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "MLFLOW_TRACKING_URI": env_uri, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "codeworld.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_compare_tables_phases_and_pipelines_and_plots(mlflow_url, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    exp = f"compare-{tmp_path.name}"
    _fake_pipeline(exp, {"pretrain": [8.0, 7.0, 6.5], "midtrain": [6.4, 5.9, 5.1]})
    _fake_pipeline(exp, {"pretrain": [8.1, 7.2, 6.9], "midtrain": [6.8, 6.0, 5.5]})
    params = _params(tmp_path, exp)

    out = _cli(["compare", "--params", str(params), "--plot", str(tmp_path / "c.png"),
                "--csv", str(tmp_path / "c.csv")], mlflow_url, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    header = next(l for l in out.stdout.splitlines() if l.startswith("| metric"))
    assert header == "| metric | pretrain | midtrain |"     # the latest pipeline's phases, in order
    row = next(l for l in out.stdout.splitlines() if l.startswith("| final_loss"))
    assert row == "| final_loss | 6.9 | 5.5 |"
    assert "loss curves of 2 runs" in out.stdout
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "c.csv").read_text().splitlines()[0] == "metric,pretrain,midtrain"

    out = _cli(["compare", "--params", str(params), "--pipelines", "2", "--metric", "final_loss"],
               mlflow_url, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
            for l in out.stdout.splitlines() if l.startswith("| ")}
    assert rows["midtrain.final_loss"] == ["5.1", "5.5"]      # oldest pipeline first
    assert rows["pretrain.final_loss"] == ["6.5", "6.9"]

    bad = _cli(["compare", "--params", str(params), "--metric", "no_such_metric"], mlflow_url, tmp_path)
    assert bad.returncode != 0 and "no_such_metric" in bad.stderr
    missing = _cli(["compare", "--params", str(params), "--experiment", "never-created"],
                   mlflow_url, tmp_path)
    assert missing.returncode != 0 and "never-created" in missing.stderr


def _checkpoint(root: Path, phase: str, fingerprint: str, iteration: int,
                tokenizer_sha256: str | None = None) -> None:
    """A phase directory in the layout training writes (run.json, latest.json, iter_N/)."""
    d = root / "checkpoints" / phase
    it = d / f"iter_{iteration:07d}"
    it.mkdir(parents=True)
    (it / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (it / "metadata.json").write_text("{}")
    (d / "run.json").write_text(json.dumps({"phase": phase, "fingerprint": fingerprint,
                                            "tokenizer_sha256": tokenizer_sha256}))
    (d / "latest.json").write_text(json.dumps({"iteration": iteration, "dir": it.name}))
    (d / "params.json").write_text("{}")


def _tokenizer(storage, body: bytes) -> str:
    """The tokenizer stage's output under a storage root: tokenizer.json and its manifest."""
    sha = hashlib.sha256(body).hexdigest()
    storage.write_bytes("tokenizer/tokenizer.json", body)
    storage.write_bytes("tokenizer/manifest.json", json.dumps({"name": "tokenizer", "sha256": sha}).encode())
    return sha


def _export(storage, phase: str, iteration: int, fingerprint: str) -> None:
    """The export stage's folder under a storage root: its files, then codeworld.json naming them."""
    config = b"{}"
    storage.write_bytes("export/config.json", config)
    storage.write_bytes("export/codeworld.json", json.dumps({
        "phase": phase, "iteration": iteration,
        "lineage": [{"phase": phase, "iteration": iteration, "fingerprint": fingerprint}],
        "files": {"config.json": hashlib.sha256(config).hexdigest()}}).encode())


def test_register_final_checkpoint_with_lineage_once(mlflow_url, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from codeworld.registry import RegistryError, register_final

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "corpus": {"cmd": "x", "outs": [{"path": "data/corpus", "md5": "abc.dir"}]}}}))
    params = load_params(_params(tmp_path, f"registry-{tmp_path.name}"))
    with pytest.raises(RegistryError, match="no training phase has a checkpoint"):
        register_final(params)

    storage = Storage(str(tmp_path / "data"))
    _checkpoint(tmp_path / "data", "pretrain", "fp-pre", 200, hashlib.sha256(b'{"model": "bpe"}').hexdigest())
    # no tokenizer: not registered without it, and told where it was looked for
    with pytest.raises(RegistryError, match=re.escape(
            f"{tmp_path / 'data' / 'tokenizer' / 'tokenizer.json'}: no tokenizer there")):
        register_final(params)
    tok_sha = _tokenizer(storage, b'{"model": "bpe"}')
    # the export stage's folder of that checkpoint goes with it; one of another iteration would not
    export = tmp_path / "data" / "export"
    _export(storage, "pretrain", 200, "fp-pre")
    import mlflow

    mlflow.set_experiment(params.tracking.experiment)
    with mlflow.start_run(run_name="pipeline"):   # as in the flow: its run is active here
        first = register_final(params)
    assert first["new"] and first["phase"] == "pretrain"
    again = register_final(params)
    assert not again["new"] and again["version"] == first["version"]

    client = MlflowClient()
    v = client.get_model_version(first["name"], first["version"])
    assert v.tags["checkpoint.fingerprint"] == "fp-pre"
    assert v.tags["checkpoint.iteration"] == "200"
    assert v.tags["lineage.pretrain.fingerprint"] == "fp-pre"
    assert v.tags["dvc.corpus.data/corpus"] == "abc.dir"
    # the registered version's artifacts are the checkpoint's files
    files = {f.path for f in client.list_artifacts(first["run_id"], "checkpoint")}
    assert {"checkpoint/__0_0.distcp", "checkpoint/params.json", "checkpoint/tokenizer.json"} <= files
    assert v.tags["tokenizer.sha256"] == tok_sha
    assert v.tags["export.hf"] == f"runs:/{first['run_id']}/hf"
    assert {f.path for f in client.list_artifacts(first["run_id"], "hf")} == {
        "hf/codeworld.json", "hf/config.json"}
    from codeworld.registry import export_of

    assert export_of(export, "pretrain", 200, "fp-pre")
    assert not export_of(export, "pretrain", 100, "fp-pre")       # another iteration
    assert not export_of(export, "pretrain", 200, "fp-retrained")  # a rerun of the phase
    assert not export_of(export, "sft", 200, "fp-pre")
    assert not export_of(tmp_path / "none", "pretrain", 200, "fp-pre")

    # the same run trained on (a resume): its later checkpoint is a new version, registered once
    it = tmp_path / "data" / "checkpoints" / "pretrain" / "iter_0000300"
    shutil.copytree(it.parent / "iter_0000200", it)
    (it.parent / "latest.json").write_text(json.dumps({"iteration": 300, "dir": it.name}))
    later = register_final(params)
    assert later["new"] and later["version"] != first["version"]
    assert client.get_model_version(first["name"], later["version"]).tags["checkpoint.iteration"] == "300"
    assert register_final(params)["version"] == later["version"]
    # a name with a quote in it is searched for as it is: found again, not registered twice
    quoted = register_final(params, name="team's model")
    assert quoted["new"] and register_final(params, name="team's model")["version"] == quoted["version"]


def test_compare_refuses_an_unknown_run_and_a_folder_as_plot(mlflow_url, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    exp = f"compare-errors-{tmp_path.name}"
    _fake_pipeline(exp, {"pretrain": [8.0, 7.0]})
    params = _params(tmp_path, exp)
    out = _cli(["compare", "--params", str(params), "--runs", "deadbeef"], mlflow_url, tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "codeworld compare: error: --runs deadbeef: no such MLflow run" in out.stderr
    folder = tmp_path / "plots"
    folder.mkdir()
    out = _cli(["compare", "--params", str(params), "--plot", str(folder)], mlflow_url, tmp_path)
    assert out.returncode == 2 and f"--plot {folder}: is a folder" in out.stderr
    assert "| metric" not in out.stdout          # refused before the table
    # a name without a suffix is a PNG (it failed on the temporary file's .tmp suffix)
    out = _cli(["compare", "--params", str(params), "--plot", str(tmp_path / "plot")], mlflow_url, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "plot").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_prints_counts_exactly_and_floats_without_exponents():
    from codeworld.compare import Column, markdown

    col = Column("r1", "corpus", {"records": 13347.0, "kept_bytes": 157_600_123.0,
                                  "tokens_per_s_median": 12345.678, "final_loss": 6.9,
                                  "lr": 3e-05, "neg": -2.0})
    rows = {l.split("|")[1].strip(): l.split("|")[2].strip()
            for l in markdown([col], list(col.metrics)).splitlines()[3:]}
    assert rows == {"records": "13347", "kept_bytes": "157600123", "tokens_per_s_median": "12345.7",
                    "final_loss": "6.9", "lr": "3e-05", "neg": "-2"}


def test_compare_bar_chart_marks_a_missing_value_instead_of_a_zero_bar(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from codeworld import compare

    bars = []
    real_bar = Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda self, x, h, *a, **k: bars.append((list(x), list(h)))
                        or real_bar(self, x, h, *a, **k))
    monkeypatch.setattr(compare, "_client", lambda: None)   # no run logged a loss: no query
    cols = [compare.Column("r1", "corpus", {"records": 10.0}), compare.Column("r2", "dedup", {}),
            compare.Column("r3", "traces", {"records": 4.0})]
    what = compare.plot(cols, ["records"], tmp_path / "bar.png")
    assert bars == [([0, 2], [10.0, 4.0])]                  # no bar for dedup, not a bar at 0
    assert what == "bar chart of records (1 of 3 runs without it: n/a)"
    assert (tmp_path / "bar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_metric_picks_rows_by_the_rule_it_checks_them_by():
    """--metric NAME names a row by its whole key or by a dotted tail of it; the check for
    unknown names and the row filter use that one rule (a tail of two parts, as --pipelines
    keys evaluate.midtrain.state_exact_match, passed the check and then gave no row)."""
    from codeworld.compare import Column, CompareError, metric_rows

    cols = [Column("p1", "p1", {"evaluate.midtrain.state_exact_match": 0.5,
                                "evaluate.sft.state_exact_match": 0.6,
                                "midtrain.final_loss": 5.1, "midtrain.final_loss_ema": 5.2})]
    assert metric_rows(cols, ["midtrain.state_exact_match"]) == ["evaluate.midtrain.state_exact_match"]
    assert metric_rows(cols, ["state_exact_match"]) == ["evaluate.midtrain.state_exact_match",
                                                        "evaluate.sft.state_exact_match"]
    assert metric_rows(cols, ["evaluate.sft.state_exact_match"]) == ["evaluate.sft.state_exact_match"]
    assert metric_rows(cols, ["final_loss"]) == ["midtrain.final_loss"]   # not final_loss_ema
    for name in ("exact_match", "t.state_exact_match", "sft"):   # no key ends in "." + name
        with pytest.raises(CompareError, match=rf"no run has metric\(s\) {re.escape(name)} \(known"):
            metric_rows(cols, [name])


def test_compare_same_phase_of_two_pipelines_gets_two_curves_and_two_columns(mlflow_url, tmp_path,
                                                                            monkeypatch):
    """Two runs with one name (midtrain of two pipeline runs): the plot drew one curve (curves
    were keyed by run name) and the table had two columns headed alike. Each run is its own
    curve and column, the duplicates labelled with a short run id."""
    from matplotlib.axes import Axes
    from mlflow.tracking import MlflowClient

    from codeworld import compare

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    exp = f"compare-same-{tmp_path.name}"
    first = _fake_pipeline(exp, {"pretrain": [8.0, 7.0], "midtrain": [6.4, 5.9, 5.1]})
    second = _fake_pipeline(exp, {"pretrain": [8.1, 7.2], "midtrain": [6.8, 6.0, 5.5]})
    client = MlflowClient(mlflow_url)
    exp_id = client.get_experiment_by_name(exp).experiment_id
    mid = [next(r.info.run_id for r in compare._children(client, exp_id, p)
                if r.data.tags["mlflow.runName"] == "midtrain") for p in (first, second)]

    cols = compare.columns_for(exp, runs=mid + [mid[0]])      # the same run twice, too
    names = [f"midtrain ({mid[0][:8]})", f"midtrain ({mid[1][:8]})"]
    assert [c.name for c in cols] == [names[0], names[1], names[0]]
    header = compare.markdown(cols, compare.metric_rows(cols, ["final_loss"])).splitlines()
    assert header[0] == f"| metric | {names[0]} | {names[1]} | {names[0]} |"
    assert header[3] == "| final_loss | 5.1 | 5.5 | 5.1 |"

    drawn = []
    real_plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, *a, **k: drawn.append((k.get("label"), list(y)))
                        or real_plot(self, x, y, *a, **k))
    what = compare.plot(cols, [], tmp_path / "curves.png")
    assert what == "loss curves of 2 runs"
    assert drawn == [(names[0], [6.4, 5.9, 5.1]), (names[1], [6.8, 6.0, 5.5])]
    # names that differ stay as they are
    cols = compare.columns_for(exp, runs=[mid[1], compare._children(client, exp_id, second)[0].info.run_id])
    assert [c.name for c in cols] == ["midtrain", "pretrain"]


def test_register_reads_tokenizer_and_export_under_an_s3_storage_root(mlflow_url, s3_endpoint, s3_bucket,
                                                                     tmp_path, monkeypatch):
    """With storage.root on S3 the checkpoints stay in data/checkpoints/<phase> but the
    tokenizer and the export are written under the root, and data/tokenizer holds only a pinned
    manifest: the registry looked beside the checkpoints, so it left the tokenizer out (or
    registered a stale local copy) and never attached the export. It reads them under the
    root, refuses a missing tokenizer naming where it looked, and one the phase did not train with."""
    from mlflow.tracking import MlflowClient

    from codeworld.registry import RegistryError, register_final

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    monkeypatch.chdir(tmp_path)
    root = f"{s3_bucket}/prefix"
    exp = f"registry-s3-{tmp_path.name}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "storage": {"root": root, "s3_endpoint_url": s3_endpoint},
        "tracking": {"experiment": exp, "registered_model": f"{exp}-model"}}))
    params = load_params(tmp_path / "params.yaml")
    storage = Storage(root, s3_endpoint)
    body = b'{"model": "bpe trained on the S3 root"}'
    sha = hashlib.sha256(body).hexdigest()
    _checkpoint(tmp_path / "data", "pretrain", "fp-s3", 100, sha)
    # what the tokenizer stage leaves locally with an S3 root (pin_manifest), and a stale
    # tokenizer.json of an earlier run on a local root
    pinned = tmp_path / "data" / "tokenizer"
    pinned.mkdir(parents=True)
    (pinned / "manifest.json").write_text(json.dumps({"sha256": sha, "location": f"{root}/tokenizer"}))
    (pinned / "tokenizer.json").write_bytes(b'{"model": "stale local"}')
    client = MlflowClient()

    where = f"{root}/tokenizer/tokenizer.json"
    with pytest.raises(RegistryError, match=re.escape(f"{where}: no tokenizer there")):
        register_final(params)
    _tokenizer(storage, b'{"model": "retrained since"}')
    with pytest.raises(RegistryError, match=re.escape(where) + r".*records training with "
                       + sha[:12] + r".*not the tokenizer of this checkpoint"):
        register_final(params)
    assert client.search_model_versions(f"name = '{exp}-model'") == []   # nothing registered

    _tokenizer(storage, body)
    _export(storage, "pretrain", 100, "fp-s3")
    info = register_final(params)
    assert info["new"]
    got = Path(client.download_artifacts(info["run_id"], "checkpoint/tokenizer.json", str(tmp_path / "dl")))
    assert got.read_bytes() == body                       # the root's, not the stale local one
    v = client.get_model_version(info["name"], info["version"])
    assert v.tags["tokenizer.sha256"] == sha
    assert v.tags["export.hf"] == f"runs:/{info['run_id']}/hf"
    assert {f.path for f in client.list_artifacts(info["run_id"], "hf")} == {
        "hf/codeworld.json", "hf/config.json"}
