"""Repository environments of the agent stage: a pinned source tree, its layout, and its tests
run in the project's one sandbox (``codeworld.sandbox.run_command``).

Sources: a PyPI sdist pinned by version and sha256 (``stages.repo_traces.fetch_pypi_sdist``:
fetched once into the cache, nothing of it runs on the host), a local git repository read at a
pinned commit (``git archive``: the work tree is never used), or a local folder. Every suite runs
under pytest (which runs unittest TestCases too), so a test is always a pytest node id. pytest is
not part of any sandbox by default: its packages (and their dependencies) are bound read-only
from the host's environment at /sandbox/pytest, and PYTHONPATH points there and at the tree's
import roots (``src/`` layouts included).
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from codeworld.sandbox import Limits, run_command
from codeworld.sandbox.output import JsonLines
from codeworld.sandbox.bwrap import python_install
from stages.repo_traces import fetch_pypi_sdist, install_tree, repo_layout

RUNNER_DIR = Path(__file__).resolve().parent / "runner"
SANDBOX_LIB = "/sandbox/lib/cwagent"
OUTCOMES = ("pass", "fail", "error", "skip")   # of one test, as runner/cwtest.py reports it
SANDBOX_PYTEST = "/sandbox/pytest"
# every temp folder of the stage is `cw-agent-<pid>-...`: what a run killed with -9 leaves is
# found by its dead pid and removed at the next start (loop.sweep_orphans)
WORKDIR_PREFIX = "cw-agent-"
SANDBOX_SPEC = "/sandbox/spec"
# a command's stderr kept: its tail, all that is read of it (TestRun.stderr_tail, a tool's
# observation)
STDERR_TAIL_BYTES = 16 << 10
# Reading a run's stdout (the package's code shares the process that writes it): only lines
# that start as cwtest.py's json.dumps starts its records and summary are parsed, at most
# READ_BUDGET of a test run (a record per test: the pinned suites have a few thousand) and
# READ_SLACK more than its mutants of a mutants run, then only the summary on the last line.
# Without a budget the 16 MiB cap held 8M lines of "{" junk: the host parsed for 53 s.
TEST_START, SUMMARY_START, MUTANT_START = b'{"test": ', b'{"summary": ', b'{"mutant": '
READ_BUDGET, READ_SLACK = 100_000, 1000
# pytest and what it imports at run time (pygments: its terminal writer highlights code).
PYTEST_MODULES = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments", "py")


class EnvError(ValueError):
    """An environment that cannot be built (bad source, missing commit); names it."""


@dataclass(frozen=True)
class Env:
    """A repository environment: where its tree is and how to run its tests."""
    name: str
    tree: Path
    version: str | None = None
    sha256: str | None = None
    commit: str | None = None
    pkg_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    sys_path: tuple[str, ...] = (".",)  # import roots, relative to the tree

    @property
    def pythonpath(self) -> str:
        roots = [os.path.normpath(os.path.join("/work", p)) for p in self.sys_path]
        return ":".join([*roots, SANDBOX_PYTEST])

    @property
    def test_command(self) -> str:
        """What an agent types to run the suite (the same pytest the runner uses)."""
        return "python -m pytest -q -p no:cacheprovider -o addopts= --tb=short"

    def meta(self) -> dict:
        return {"repo": self.name, "version": self.version, "sha256": self.sha256,
                "commit": self.commit}


def _git_tree(name: str, path: str, commit: str, cache_dir: Path) -> Path:
    repo = Path(path).resolve()
    try:
        full = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                              capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        raise EnvError(f"agent.repositories[{name}]: {repo}: commit {commit!r} not found: "
                       f"{error_text(err)}") from None
    dest = cache_dir / f"{name}-{full[:12]}"
    if (dest / ".codeworld-commit").is_file():
        return dest
    try:  # the commit can be there and a blob of its tree not (a damaged or partial clone)
        archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", full],
                                 capture_output=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise EnvError(f"agent.repositories[{name}]: {repo}: git archive {full} failed: "
                       f"{error_text(err)}") from None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        install_tree(tar, dest, ".codeworld-commit", full)
    return dest


def error_text(err: Exception) -> str:
    """What a command said (its stderr) when it said something, else the error itself."""
    stderr = getattr(err, "stderr", None)
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    return stderr.strip()[-500:] if stderr and stderr.strip() else f"{type(err).__name__}: {err}"


def build_env(repo, cache_dir: str | os.PathLike) -> Env:
    """``repo``: an ``AgentRepoConfig`` (name + version/sha256, or path [+ commit])."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    commit = None
    if repo.version is None and repo.commit is None:
        tree = Path(repo.path).resolve()
        if not tree.is_dir():
            raise EnvError(f"agent.repositories[{repo.name}]: {tree} is not a directory")
    else:
        try:
            if repo.version is not None:
                tree = fetch_pypi_sdist(repo.name, repo.version, repo.sha256, cache)
            else:
                tree = _git_tree(repo.name, repo.path, repo.commit, cache)
                commit = (tree / ".codeworld-commit").read_text().strip()
        except tarfile.TarError as err:  # a link out of the tree (to /etc/...), a corrupt archive
            raise EnvError(f"agent.repositories[{repo.name}]: its source tree cannot be "
                           f"extracted safely: {type(err).__name__}: {err}") from None
    lay = repo_layout(tree)
    sys_path = tuple(os.path.relpath(p, "/work") for p in lay["sys_path"])
    return Env(repo.name, tree, repo.version, repo.sha256, commit,
               tuple(lay["pkg_files"]), tuple(lay["test_files"]), sys_path)


def with_collected_tests(env: Env, nodeids: Iterable[str]) -> Env:
    """``env`` with every package file that holds one of ``nodeids`` (pytest node ids: the file
    is what comes before the first "::") moved to its test files. repo_layout tells test files
    by their names; a suite's own config may collect others (``python_files = check_*.py``),
    and they are tests all the same: the reward must not take the agent's version of them,
    nor the synthesis put bugs in them. Unchanged (the same object) when none moves."""
    held = {n.split("::", 1)[0] for n in nodeids}
    moved = tuple(f for f in env.pkg_files if f in held)
    if not moved:
        return env
    return replace(env, pkg_files=tuple(f for f in env.pkg_files if f not in held),
                   test_files=(*env.test_files, *moved))


def pytest_binds() -> list[tuple[str, str]]:
    """(host, sandbox) read-only binds that make the host's pytest importable in the sandbox."""
    binds = []
    for mod in PYTEST_MODULES:
        spec = importlib.util.find_spec(mod)
        if spec is None or spec.origin is None:
            if mod == "py":  # a shim module, absent from older pytest releases
                continue
            raise EnvError(f"{mod} is not installed: the agent stage runs suites with pytest "
                           f"(pip install pytest)")
        src = os.path.dirname(spec.origin) if spec.submodule_search_locations else spec.origin
        binds.append((src, f"{SANDBOX_PYTEST}/{os.path.basename(src)}"))
    return binds


def sandbox(argv: list[str], workdir: Path, env: Env, *, writable: bool = False,
            wall_seconds: float = 60.0, memory_mb: int = 2048, spec: dict | None = None,
            output_bytes: int = 16 << 20, quota_mb: int | None = None):
    """Run ``argv`` in a fresh sandbox with ``workdir`` at /work, the runner at
    /sandbox/lib/cwagent and pytest importable; ``spec`` (JSON) is readable at
    /sandbox/spec/spec.json. ``quota_mb`` (with ``writable``): /work is a copy of ``workdir``
    on a tmpfs of that size, written back after the command (``codeworld.sandbox.quota``).
    Of its stderr only the last STDERR_TAIL_BYTES are kept.
    Returns the sandbox's CommandResult."""
    limits = Limits(wall_seconds=wall_seconds, cpu_seconds=wall_seconds,
                    memory_bytes=memory_mb << 20, output_bytes=output_bytes, max_processes=32)
    binds = [(RUNNER_DIR, SANDBOX_LIB), *pytest_binds()]
    with tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-spec-") as spec_dir:
        os.chmod(spec_dir, 0o755)  # readable by the sandbox's unprivileged uid
        if spec is not None:
            p = Path(spec_dir) / "spec.json"
            p.write_text(json.dumps(spec))
            p.chmod(0o644)
        binds.append((spec_dir, SANDBOX_SPEC))
        return run_command(argv, workdir=workdir, writable_workdir=writable, limits=limits,
                           extra_ro_binds=binds,
                           workdir_quota_bytes=quota_mb << 20 if quota_mb else None,
                           stderr_tail_bytes=STDERR_TAIL_BYTES,
                           # no plugins from whatever the base interpreter has installed
                           env={"PYTHONPATH": env.pythonpath, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})


def _runner_argv() -> list[str]:
    # not -I/-E: they would drop the sandbox's PYTHONHASHSEED=0 and PYTHONPATH
    return [python_install()[0], "-s", "-P", f"{SANDBOX_LIB}/cwtest.py", f"{SANDBOX_SPEC}/spec.json"]


@dataclass
class TestRun:
    outcomes: dict[str, str] = field(default_factory=dict)  # node id -> pass/fail/error/skip
    messages: dict[str, str] = field(default_factory=dict)  # node id -> short traceback
    lines: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # node id -> covered
    summary: dict = field(default_factory=dict)
    timed_out: bool = False
    stderr_tail: str = ""

    @property
    def passed(self) -> set[str]:
        return {t for t, o in self.outcomes.items() if o == "pass"}


def run_tests(tree: Path, env: Env, tests: list[str] | None = None, *, coverage: bool = False,
              wall_seconds: float = 120.0, canary_file: str | None = None) -> TestRun:
    """Run ``tests`` (all when None) of the tree at ``tree`` in the sandbox (read-only).
    ``canary_file``: the reward's canary tests (relative to the tree), collected whatever
    names the project's pytest config gives its tests (runner/cwtest.py)."""
    spec = {"mode": "run", "root": "/work", "sys_path": list(env.sys_path), "tests": tests,
            "coverage": coverage, "pkg_files": list(env.pkg_files), "canary_file": canary_file}
    res = sandbox(_runner_argv(), tree, env, wall_seconds=wall_seconds, spec=spec)
    out = TestRun(timed_out=res.timed_out)
    # the package's code runs in the process that prints these lines: take only well-formed
    # ones (a record of another shape must not stop the stage reading it)
    lines = JsonLines(res.stdout_bytes, cut=res.stdout_truncated,
                      starts=(TEST_START, SUMMARY_START))
    for rec in lines.read(READ_BUDGET, last_starts=(SUMMARY_START,)):
        if not isinstance(rec, dict):
            continue
        if isinstance(rec.get("summary"), dict):
            out.summary = rec["summary"]
        elif isinstance(rec.get("test"), str) and rec.get("outcome") in OUTCOMES:
            out.outcomes[rec["test"]] = rec["outcome"]
            if isinstance(rec.get("message"), str) and rec["message"]:
                out.messages[rec["test"]] = rec["message"]
            if isinstance(rec.get("lines"), dict):
                out.lines[rec["test"]] = rec["lines"]
    if not out.summary:
        out.stderr_tail = res.stderr[-2000:]
    return out


def run_mutants(tree: Path, env: Env, mutants: list[dict], *, timeout: float,
                wall_seconds: float) -> dict[str, dict]:
    """Each mutant ``{"id", "file", "source", "tests"}`` run in one sandbox (more, see below):
    {id: result}.

    The runner runs as the tests' uid and prints a mutant's result once its run is over, in
    order: when it ends (or its sandbox times out) with mutants left unprinted, the tests of the
    first of them killed or stopped it (what it can catch it survives, see cwtest.py). That
    mutant's result is then ``runner_killed`` and the rest run again in a fresh sandbox (at
    most one sandbox a mutant). A cut output gives no culprit: its mutants stay missing."""
    results, todo = {}, list(mutants)
    while todo:
        res = _mutants_run(tree, env, todo, timeout=timeout, wall_seconds=wall_seconds)
        got = _mutant_records(res, todo)
        results.update(got)
        left = [m for m in todo if m["id"] not in got]
        if not left or res.stdout_truncated or (res.returncode == 0 and not res.timed_out):
            break
        why = ("the sandbox timed out while it ran" if res.timed_out
               else f"the runner exited {res.returncode} while it ran")
        results[left[0]["id"]] = {
            "mutant": left[0]["id"], "status": "runner_killed", "outcomes": {}, "messages": {},
            "error": f"its tests killed or stopped the mutants' runner: {why}"}
        todo = left[1:]
    return results


def _mutants_run(tree: Path, env: Env, mutants: list[dict], *, timeout: float,
                 wall_seconds: float):
    spec = {"mode": "mutants", "root": "/work", "sys_path": list(env.sys_path),
            "timeout": timeout, "mutants": mutants}
    return sandbox(_runner_argv(), tree, env, wall_seconds=wall_seconds, spec=spec)


def _mutant_records(res, mutants: list[dict]) -> dict[str, dict]:
    """The well-formed mutant result lines of a run's output (of ``mutants``), by id."""
    results = {}
    lines = JsonLines(res.stdout_bytes, cut=res.stdout_truncated, starts=(MUTANT_START,))
    for rec in lines.read(len(mutants) + READ_SLACK):
        if isinstance(rec, dict) and isinstance(rec.get("mutant"), str) and \
                isinstance(rec.get("outcomes"), dict) and isinstance(rec.get("messages"), dict):
            results[rec["mutant"]] = rec
    return results
