"""The CLI's user errors: a bad path or option value ends in one `codeworld CMD: error: ...` line
and exit 2 (EXIT_BAD_INPUT), before any work, never in a traceback or in lost data; a storage
failure that may pass, or a tracking server that is down, is exit 75 (EXIT_TRANSIENT); a bug
keeps its traceback."""

from __future__ import annotations

import json

import pytest
import yaml

from codeworld import cli

RECORDS = [{"id": "a", "text": "def f(x):\n    return x + 1\n"},
           {"id": "b", "text": "def f(x):\n    return x + 1\n"},
           {"id": "c", "text": "import os\nprint(os.getcwd())\n"}]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def run(capsys, *argv) -> tuple[int, str]:
    """cli.main's exit status (argparse's too) and its stderr."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        rc = exit_.code
    return rc, capsys.readouterr().err


def test_an_output_over_an_input_or_another_output_is_refused_before_any_work(tmp_path, jsonl, capsys):
    before = jsonl.read_bytes()
    rc, err = run(capsys, "dedup", jsonl, jsonl)
    assert rc == 2 and f"output {jsonl} is the same path as input {jsonl}" in err
    # the same file by another spelling, or through a symlink
    (tmp_path / "sub").mkdir()
    rc, err = run(capsys, "dedup", jsonl, tmp_path / "sub" / ".." / "in.jsonl")
    assert rc == 2 and "same path as input" in err
    (tmp_path / "link.jsonl").symlink_to(jsonl)
    rc, err = run(capsys, "trace", tmp_path / "link.jsonl", jsonl)
    assert rc == 2 and str(tmp_path / "link.jsonl") in err and str(jsonl) in err
    # the report where the records go, or over the input
    out = tmp_path / "o.jsonl"
    rc, err = run(capsys, "dedup", jsonl, out, "--report", out)
    assert rc == 2 and f"report {out} is the same path as output {out}" in err
    rc, err = run(capsys, "dedup", jsonl, out, "--report", jsonl)
    assert rc == 2 and f"report {jsonl} is the same path as input {jsonl}" in err
    assert not out.exists() and jsonl.read_bytes() == before
    # a shard dataset, a folder or a REPO@COMMIT source as the output
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (dataset / "manifest.json").write_text("{}")
    rc, err = run(capsys, "dedup", dataset, f"{dataset}/")
    assert rc == 2 and "same path as input" in err
    rc, err = run(capsys, "corpus", tmp_path / "sub", jsonl, tmp_path / "sub")
    assert rc == 2 and f"is the same path as source {tmp_path / 'sub'}" in err
    rc, err = run(capsys, "corpus", f"{tmp_path / 'sub'}@abc123", tmp_path / "sub")
    assert rc == 2 and "same path as source" in err
    rc, err = run(capsys, "compare", "--csv", tmp_path / "c.out", "--plot", tmp_path / "c.out")
    assert rc == 2 and "--plot" in err and "--csv" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "in.jsonl", "link.jsonl", "sub"]


@pytest.mark.parametrize("argv, flag", [
    (["dedup", "IN", "OUT", "--threshold", "1.5"], "--threshold"),
    (["dedup", "IN", "OUT", "--threshold", "0"], "--threshold"),
    (["dedup", "IN", "OUT", "--workers", "0"], "--workers"),
    (["corpus", "SRC", "OUT", "--max-bytes", "0"], "--max-bytes"),
    (["corpus", "SRC", "OUT", "--workers", "-1"], "--workers"),
    (["trace", "IN", "OUT", "--timeout", "0"], "--timeout"),
    (["trace", "IN", "OUT", "--timeout", "nan"], "--timeout"),
    (["trace", "IN", "OUT", "--max-events", "0"], "--max-events"),
    (["trace", "IN", "OUT", "--workers", "-2"], "--workers"),
    (["debug", "F.py", "--call", "f()", "--timeout", "0"], "--timeout"),
    (["debug", "F.py", "--call", "f()", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["compare", "--pipelines", "-1"], "--pipelines"),
])
def test_a_bad_option_value_is_refused_naming_the_flag(argv, flag, capsys):
    rc, err = run(capsys, *argv)
    assert rc == 2 and f"error: argument {flag}: " in err


def test_a_value_the_config_model_refuses_names_the_field(jsonl, tmp_path, capsys):
    rc, err = run(capsys, "dedup", jsonl, tmp_path / "o.jsonl", "--workers", "300")
    assert rc == 2 and "codeworld dedup: error: invalid value: workers: " in err and "300" in err
    rc, err = run(capsys, "trace", jsonl, tmp_path / "o.jsonl", "--max-events", "5")
    assert rc == 2 and "max_events" in err


def test_missing_inputs_and_folders_where_files_belong_are_errors_naming_the_path(tmp_path, jsonl, capsys):
    missing = tmp_path / "nope.jsonl"
    for cmd in ("dedup", "trace"):
        rc, err = run(capsys, cmd, missing, tmp_path / "o.jsonl")
        assert rc == 2 and err == f"codeworld {cmd}: error: {missing}: No such file or directory\n"
    folder = tmp_path / "folder"
    folder.mkdir()
    rc, err = run(capsys, "dedup", folder, tmp_path / "o.jsonl")   # no manifest: unfinished
    assert rc == 2 and f"{folder}: a folder without manifest.json" in err
    rc, err = run(capsys, "trace", folder, tmp_path / "o.jsonl")
    assert rc == 2 and f"{folder}: Is a directory" in err
    rc, err = run(capsys, "dedup", jsonl, folder)   # the output a folder: a StorageError
    assert rc == 2 and f"codeworld dedup: error: {folder}: cannot write" in err


def test_check_params_on_a_file_that_is_not_utf8(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_bytes(b"storage:\n  root: \xff\xfe\n")
    rc, err = run(capsys, "check-params", "--params", params)
    assert rc == 2 and f"codeworld check-params: error: {params}: not UTF-8 text" in err


def fail_in_storage(cause: BaseException | None) -> None:
    """A write that fails in the storage layer with `cause` (None: no such bucket), the
    StorageError made as codeworld.storage makes it. Module level: a worker process runs it."""
    from codeworld.storage import _named

    with _named("s3://b/o.jsonl", "write", missing_is_state=False):
        raise cause or FileNotFoundError(2, "No such file or directory")


STORAGE_CAUSES = [
    (PermissionError(13, "Permission denied"), 2),        # a read-only output folder
    (IsADirectoryError(21, "Is a directory"), 2),
    (None, 2),                                            # storage.py's own: no such bucket
    (ConnectionResetError(104, "Connection reset by peer"), 75),
    (OSError(121, "Remote I/O error"), 75),               # s3fs's S3 InternalError
    (TimeoutError("read timed out"), 75),
]
try:   # no credentials: was exit 75, and the flow retried a run that cannot pass
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    STORAGE_CAUSES += [(NoCredentialsError(), 2),
                       (PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"), 2)]
except ImportError:
    pass


@pytest.mark.parametrize("in_workers", [False, True], ids=["in-process", "in-worker-processes"])
@pytest.mark.parametrize("cause, rc", STORAGE_CAUSES)
def test_a_storage_error_is_bad_input_or_transient_by_its_cause(cause, rc, in_workers, jsonl,
                                                                 tmp_path, monkeypatch, capsys):
    """Also when raised in a worker process, whose error comes back with the remote traceback
    as its __cause__ (a PermissionError there was exit 75, a retry that cannot pass)."""
    from codeworld.parallel import pool_map

    def fail(*_a, **_k):
        if in_workers:
            pool_map(fail_in_storage, [cause, cause], 2, "dedup")
        fail_in_storage(cause)

    monkeypatch.setattr("stages.adhoc.dedup_adhoc", fail)
    got, err = run(capsys, "dedup", jsonl, tmp_path / "o.jsonl")
    assert got == rc and "s3://b/o.jsonl: cannot write" in err
    assert ("transient error (retry)" in err) == (rc == 75)


def test_a_bug_keeps_its_traceback(jsonl, tmp_path, monkeypatch):
    def bug(*_a, **_k):
        raise ValueError("a bug")

    monkeypatch.setattr("stages.adhoc.dedup_adhoc", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["dedup", str(jsonl), str(tmp_path / "o.jsonl")])


def test_debug_refuses_a_file_or_call_that_does_not_compile_before_tracing(tmp_path, monkeypatch,
                                                                          capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "data")}}))

    def trace_real(*_a, **_k):   # neither the sandbox nor a model may be reached
        raise AssertionError("traced a program that does not compile")

    monkeypatch.setattr("codeworld.debugger.trace_real", trace_real)
    bad = tmp_path / "syn.py"
    bad.write_text("x = 1\ndef f(x)\n    return x\n")
    rc, err = run(capsys, "debug", bad, "--call", "f(1)", "--params", params)
    assert rc == 2 and f"codeworld debug: error: {bad}:2: SyntaxError" in err
    good = tmp_path / "prog.py"
    good.write_text("def f(x):\n    return x\n")
    rc, err = run(capsys, "debug", good, "--call", "f((", "--params", params)
    assert rc == 2 and "--call 'f((': not an expression" in err
    rc, err = run(capsys, "debug", tmp_path / "nope.py", "--call", "f(1)", "--params", params)
    assert rc == 2 and "nope.py: cannot read" in err
    # a file as Python reads it: a UTF-8 BOM (Windows editors write one) or a coding cookie;
    # the BOM was a SyntaxError ("invalid non-printable character U+FEFF"), exit 2
    from codeworld.debugger import DebugError

    traced = []

    def trace_stop(code, *_a, **_k):
        traced.append(code)
        raise DebugError("reached tracing")

    monkeypatch.setattr("codeworld.debugger.trace_real", trace_stop)
    bom = tmp_path / "bom.py"
    bom.write_bytes(b"\xef\xbb\xbfdef f(x):\n    return x\n")
    latin = tmp_path / "latin.py"
    latin.write_bytes(b"# -*- coding: latin-1 -*-\ndef f(x):\n    return '\xe9' + x\n")
    for prog in (bom, latin):
        rc, err = run(capsys, "debug", prog, "--call", "f('a')", "--params", params)
        assert rc == 2 and "reached tracing" in err, err
    assert traced == ["def f(x):\n    return x\n",
                      "# -*- coding: latin-1 -*-\ndef f(x):\n    return '\u00e9' + x\n"]


def test_a_stage_keeps_the_traceback_of_a_missing_file(tmp_path, monkeypatch):
    """`codeworld stage` reads the pipeline's own files: a missing one is a failure to debug."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "data")}}))

    def run_stage(*_a, **_k):
        raise FileNotFoundError(2, "No such file or directory", "data/dedup/manifest.json")

    monkeypatch.setattr("stages.dedup.run", run_stage)
    with pytest.raises(FileNotFoundError):
        cli.main(["stage", "dedup", "--params", str(params), "--no-track"])


@pytest.fixture
def tracking_down(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI at a closed loopback port (a tracking server that is down), MLflow's
    HTTP retries off so that the failure comes at once; MLflow's global state put back after."""
    import contextlib
    import socket

    import mlflow

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.chdir(tmp_path)   # a sqlite store's artifacts go to ./mlruns
    yield uri
    with contextlib.suppress(Exception):
        mlflow.end_run()   # a run a test left active (popped even when closing it fails)
    mlflow.set_tracking_uri(None)


def _stage_params(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "data")}}))
    return params


def test_a_tracking_server_that_is_down_is_a_transient_error_naming_it(tracking_down, tmp_path,
                                                                        monkeypatch, capsys):
    from codeworld.tracking import StageRun

    ran = []

    def run_stage(params, track):
        with StageRun("dedup", {}, track=track):
            ran.append("dedup")

    monkeypatch.setattr("stages.dedup.run", run_stage)
    rc, err = run(capsys, "stage", "dedup", "--params", _stage_params(tmp_path))
    # was an MlflowException traceback, exit 1: never retried by the flow
    assert rc == 75 and not ran, err
    assert (f"codeworld stage: transient error (retry): MLflow tracking server {tracking_down} "
            "unreachable: ") in err and "Connection refused" in err
    assert "Traceback" not in err


def test_a_stages_own_error_is_not_hidden_by_the_tracking_server_going_down(tracking_down,
                                                                            tmp_path, monkeypatch,
                                                                            capsys):
    import mlflow

    from codeworld.config import ConfigError
    from codeworld.tracking import StageRun

    def run_stage(params, track, fail):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        with StageRun("dedup", {}, track=track):
            mlflow.set_tracking_uri(tracking_down)   # the server goes down during the stage
            if fail:
                raise ConfigError("dedup.threshold: the stage's own error")

    for fail, rc, says in ((True, 2, "error: dedup.threshold: the stage's own error"),
                           (False, 75, f"MLflow tracking server {tracking_down} unreachable")):
        monkeypatch.setattr("stages.dedup.run", lambda p, track: run_stage(p, track, fail))
        got, err = run(capsys, "stage", "dedup", "--params", _stage_params(tmp_path))
        assert got == rc and says in err and "Traceback" not in err, err


def test_pipeline_refuses_an_unknown_stage_before_starting_prefect(monkeypatch, capsys):
    def pipeline(*_a, **_k):
        raise AssertionError("the flow started (and Prefect's temporary server with it)")

    monkeypatch.setattr("flows.pipeline.pipeline", pipeline)
    rc, err = run(capsys, "pipeline", "--stage", "dedup", "--stage", "nosuch")
    # was a traceback and exit 1, after the temporary server had started
    assert rc == 2 and "codeworld pipeline: error: --stage nosuch: no such stage in " in err
    assert "dvc.yaml (its stages: corpus, dedup, " in err and "Traceback" not in err


@pytest.mark.parametrize("transient, rc, says", [(False, 1, "error: stage 'sft' failed (exit 3)"),
                                                 (True, 75, "transient error (retry): stage 'sft'")])
def test_a_pipeline_stage_that_fails_for_good_is_an_error_not_a_traceback(
        transient, rc, says, monkeypatch, capsys):
    from flows.pipeline import StageFailed

    def pipeline(*_a, **_k):   # what the flow raises once a stage's retries are spent
        raise StageFailed("sft", 3, "RuntimeError: loss is nan at step 7", transient)

    monkeypatch.setattr("flows.pipeline.pipeline", pipeline)
    got, err = run(capsys, "pipeline", "--stage", "sft")
    # was a traceback and exit 1 (flows' StageFailed was not the one the command line caught)
    assert got == rc and says in err and "loss is nan at step 7" in err, err
    assert "Traceback" not in err


def test_tagging_a_training_run_during_an_outage_is_an_outage(tracking_down):
    """A phase tags its MLflow run (parent checkpoint, sources) before training: the server
    going down right then was an MlflowException traceback, exit 1, never retried."""
    from types import SimpleNamespace

    from codeworld.tracking import TrackingUnavailable
    from stages.train_phase import _set_tags

    with pytest.raises(TrackingUnavailable, match=f"MLflow tracking server {tracking_down} unreachable"):
        _set_tags(SimpleNamespace(run_id="0" * 32), {"codeworld.parent_iteration": "4"})


def test_check_params_names_a_pack_dataset_that_is_no_dep_of_pack(tmp_path, capsys):
    """One error line, exit 2: the dataset's field and value, and dvc.yaml's missing dep."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "dvc.yaml").write_text((root / "dvc.yaml").read_text())
    params = tmp_path / "params.yaml"
    params.write_text((root / "params.yaml").read_text().replace(
        "code: {dataset: dedup,", "code: {dataset: dedupe,"))
    rc, err = run(capsys, "check-params", "--params", params)
    assert rc == 2 and err.count("\n") == 1, err
    assert (f"codeworld check-params: error: {params}: pack.sources.code.dataset 'dedupe': "
            f"data/dedupe is not a dep of stage pack in {tmp_path / 'dvc.yaml'}") in err
