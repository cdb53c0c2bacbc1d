"""The data stages on a real two-worker Dask cluster (executor.kind: dask) give the same bytes
as in-process runs; a bad address, a worker without the sandbox, a worker that sees other
files and a failing job all fail clearly."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from distributed import Client, LocalCluster, get_task_stream

from codeworld import cli
from codeworld.config import ExecutorConfig, TracesConfig, load_params
from codeworld.executor import Expect, ExecutorUnreachable, WorkerMismatch, environment
from codeworld.parallel import pool_map
from codeworld.sandbox import SandboxUnavailable
from stages import corpus, dedup, traces
from tests.helpers import STDLIB, make_tree, write_params

HAS_BWRAP = shutil.which("bwrap") is not None


@pytest.fixture(scope="module")
def cluster():
    """A scheduler and two single-threaded worker processes on loopback."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      scheduler_port=0, dashboard_address=None) as lc, \
            Client(lc.scheduler_address, set_as_default=False) as client:
        yield lc.scheduler_address, client


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and ".work" not in p.parts}


def _params(tmp_path: Path, name: str, src: Path, **over):
    return load_params(write_params(tmp_path / f"{name}.yaml", tmp_path / name,
                                    [{"kind": "dir", "path": str(src), "name": "t"}], **over))


def _workers_of(ts, prefix: str) -> set[str]:
    return {t["worker"] for t in ts.data if str(t["key"]).startswith(prefix)}


def test_corpus_and_dedup_on_the_cluster_are_byte_identical(tmp_path, cluster):
    address, client = cluster
    src = make_tree(tmp_path)
    small = {"corpus": {"shard_files": 6}}  # several shards: several jobs
    local = _params(tmp_path, "local", src, **small)
    fanned = _params(tmp_path, "dask", src, **small, executor={"kind": "dask", "address": address})
    corpus.run(local, track=False, metrics_path=None)
    dedup.run(local, track=False, metrics_path=None)
    with get_task_stream(client) as ts:
        corpus.run(fanned, track=False, metrics_path=None)
        dedup.run(fanned, track=False, metrics_path=None)
    # the stages' jobs ran on the cluster, and both workers took some
    assert len(_workers_of(ts, "corpus-")) == 2
    assert len(_workers_of(ts, "dedup-signatures-")) == 2
    for stage in ("corpus", "dedup"):
        a, b = _files(tmp_path / "local" / stage), _files(tmp_path / "dask" / stage)
        assert len([n for n in a if n.endswith(".tar")]) > 2  # several shards, several jobs
        assert a == b, stage
    assert not list((tmp_path / "dask" / ".work").rglob("probe-*"))  # the probe is cleaned up


@pytest.mark.skipif(not HAS_BWRAP, reason="needs bubblewrap")
def test_traces_on_the_cluster_are_byte_identical(tmp_path, cluster):
    address, client = cluster
    src = tmp_path / "src"
    src.mkdir()
    for m in ("colorsys.py", "bisect.py"):
        (src / m).write_text((STDLIB / m).read_text())
    # batch 4 x 4 batches a chunk: 30 programs are 2 jobs per pass
    over = {"traces": {"max_programs": 30, "programs_per_shard": 30, "batch_size": 4,
                       "workers": 1, "repositories": []}}
    local = _params(tmp_path, "local", src, **over)
    corpus.run(local, track=False, metrics_path=None)
    dedup.run(local, track=False, metrics_path=None)
    shutil.copytree(tmp_path / "local", tmp_path / "dask")
    fanned = _params(tmp_path, "dask", src, **over, executor={"kind": "dask", "address": address})
    traces.run(local, track=False, metrics_path=None)
    with get_task_stream(client) as ts:
        m = traces.run(fanned, track=False, metrics_path=None)
    assert m["records"] > 5
    assert len(_workers_of(ts, "traces-sandbox-")) == 2
    assert _files(tmp_path / "local" / "traces") == _files(tmp_path / "dask" / "traces")


def _setenv(key: str, value: str | None) -> None:
    """On a worker (a function of this module: `os.environ.__setitem__` would be pickled as a
    copy of the mapping)."""
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def test_a_worker_without_the_sandbox_never_runs_the_code(tmp_path, cluster):
    """Workers whose bubblewrap is missing (CODEWORLD_BWRAP names no file, as on a machine
    without it): the job fails with the sandbox's own error, naming the worker, and the
    program never runs."""
    address, client = cluster
    marker = tmp_path / "ran"
    code = f"def f(x):\n    open({str(marker)!r}, 'w').write('unsandboxed')\n    return x\n"
    ex = ExecutorConfig(kind="dask", address=address, retries=0)
    client.run(_setenv, "CODEWORLD_BWRAP", str(tmp_path / "no-bwrap"))
    try:
        with pytest.raises(SandboxUnavailable) as err:
            traces.trace_all([{"id": "w", "code": code, "call": "f(1)"}], TracesConfig(workers=1), ex)
    finally:
        client.run(_setenv, "CODEWORLD_BWRAP", None)
    msg = str(err.value)
    assert "traces: sandbox programs 0..0 on Dask worker tcp://127.0.0.1:" in msg
    assert "no-bwrap" in msg and "Refusing to run untrusted code without a sandbox" in msg
    assert not marker.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_bad_address_fails_naming_it(tmp_path, capsys):
    address = f"tcp://127.0.0.1:{_free_port()}"  # nothing listens there
    ex = ExecutorConfig(kind="dask", address=address, connect_seconds=1)
    with pytest.raises(ExecutorUnreachable, match=f"executor.address '{address}': no Dask scheduler"):
        pool_map(len, ["a", "b"], 2, "probe", ex)
    # the stage through the CLI: a transient error (the flow retries it), the address named
    params = write_params(tmp_path / "p.yaml", tmp_path / "d", [{"kind": "dir", "path": str(STDLIB / "json")}],
                          executor={"kind": "dask", "address": address, "connect_seconds": 1})
    assert cli.main(["stage", "corpus", "--params", str(params), "--no-track"]) == cli.EXIT_TRANSIENT
    assert f"executor.address '{address}'" in capsys.readouterr().err


def _fail_on_three(n: int) -> int:
    if n == 3:
        raise ValueError(f"bad job {n}")
    return n * n


def test_jobs_come_back_in_order_and_a_failing_job_is_named(cluster):
    address, _ = cluster
    ex = ExecutorConfig(kind="dask", address=address, retries=1)
    assert pool_map(_fail_on_three, [5, 4, 2, 1, 0], 2, "squares", ex) == [25, 16, 4, 1, 0]
    with pytest.raises(ValueError, match=r"squares job 2 on Dask worker tcp://127\.0\.0\.1:\d+ .*: bad job 3") as err:
        pool_map(_fail_on_three, [1, 2, 3, 4], 2, "squares", ex)
    assert any("tried 2 times" in n for n in err.value.__notes__)


def test_a_worker_that_sees_other_files_is_refused(tmp_path, cluster, monkeypatch):
    """A relative storage root resolves against each process's working directory: the
    workers (started elsewhere) would write shards nobody reads. Refused before any job."""
    address, _ = cluster
    src = make_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    params = load_params(write_params(tmp_path / "p.yaml", Path("data"), [{"kind": "dir", "path": str(src)}],
                                      executor={"kind": "dask", "address": address, "retries": 0}))
    with pytest.raises(WorkerMismatch, match=r"sees the storage root 'data' \(probe file .*relative path"):
        corpus.run(params, track=False, metrics_path=None)
    assert not list((tmp_path / "data" / "corpus").glob("*.tar"))


def test_other_code_on_a_worker_is_named():
    here = environment()
    assert Expect(dict(here)).problem() is None
    other = Expect({**here, "code": "0" * 16}).problem()
    assert other.startswith("runs other code than the machine that submitted the jobs: code ")
