"""pool_map on this machine's processes: job order, a worker that dies mid-job, and a job's
StorageError coming back as transient or not, as it was raised."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from pathlib import Path

import pytest

from codeworld.parallel import WorkerDied, pool_map
from codeworld.storage import StorageError, _named


def _square_after(job: tuple[int, float]) -> int:
    n, delay = job
    time.sleep(delay)
    return n * n


def _write_or_die(job: tuple[str, int]) -> int:
    """Job 1 is killed (as the OOM killer would) once job 0 has finished its work."""
    folder, n = job
    if n == 1:
        while not (Path(folder) / "0").exists():
            time.sleep(0.01)
        time.sleep(0.5)   # job 0's result is back in the parent
        os.kill(os.getpid(), signal.SIGKILL)
    (Path(folder) / str(n)).write_text("done")
    return n


def test_results_come_in_job_order_whatever_order_they_finish_in():
    jobs = [(1, 0.4), (2, 0.0), (3, 0.2), (4, 0.0)]
    assert pool_map(_square_after, jobs, 2, "t") == [1, 4, 9, 16]


def _in_a_thread(fn, timeout: float) -> BaseException | None:
    """What fn() raised, run in a daemon thread: one that hangs fails the test, not the suite."""
    outcome: list = []

    def call() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            outcome.append(err)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"still running after {timeout} s (multiprocessing.Pool waits forever)"
    return outcome[0]


def test_a_killed_worker_fails_the_map_naming_its_job_and_keeps_finished_work(tmp_path):
    err = _in_a_thread(lambda: pool_map(_write_or_die, [(str(tmp_path), n) for n in range(4)], 2,
                                        "corpus", name=lambda job: f"shard {job[1]}"), 60)
    assert isinstance(err, WorkerDied), err
    msg = str(err)
    assert msg.startswith("corpus: a worker process died") and "OOM killer" in msg
    assert "shard 1" in msg and "shard 0" not in msg
    assert (tmp_path / "0").read_text() == "done"   # a rerun resumes from it


def _write_fails(cause: BaseException) -> None:
    with _named("s3://b/shard-0", "write", missing_is_state=False):
        raise cause


@pytest.mark.parametrize("cause, transient", [
    (PermissionError(13, "Permission denied"), False),
    (ConnectionResetError(104, "Connection reset by peer"), True),
])
def test_a_storage_error_from_a_worker_keeps_whether_it_is_transient(cause, transient):
    # The parent gets the job's error with a _RemoteTraceback as its __cause__: whether a retry
    # may pass is what the error says, not what its cause now is.
    with pytest.raises(StorageError, match="s3://b/shard-0: cannot write") as failed:
        pool_map(_write_fails, [cause, cause], 2, "corpus")
    assert failed.value.transient is transient


def test_a_storage_errors_transience_survives_pickling_and_the_dask_jobs_renaming():
    from codeworld.executor import _named as named_on_worker

    for transient in (True, False):
        err = StorageError("s3://b/x: cannot read", transient=transient)
        back = pickle.loads(pickle.dumps(err))   # how a Dask worker's error comes back
        assert type(back) is StorageError and back.transient is transient
        renamed = named_on_worker(back, "corpus shard 3 on Dask worker tcp://w:1")
        assert str(renamed).startswith("corpus shard 3") and renamed.transient is transient
