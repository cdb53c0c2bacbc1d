"""Repository-level traces: a repository's own test suite run under the tracer, its functions
traced as the tests call them (CWM's "repository" traces).

* :func:`fetch_pypi_sdist` downloads one sdist from PyPI at a pinned version, checks its pinned
  sha256 and extracts it (``tarfile`` with the "data" filter: no links out, no absolute paths)
  under a cache directory; a later call reuses the extracted tree. The download is a plain
  HTTPS GET (the sdist link of the package's page on PyPI's simple index, chosen by its
  pinned sha256) rather than ``pip download``: pip prepares an
  sdist's metadata by running its build backend (``setup.py`` for many projects), i.e. the
  repository's code would run on the host, outside the sandbox.
* :func:`trace_repository` runs the repository's unittest suite (``unittest`` discovery of
  ``test*.py``, plus module-level ``test_*`` functions without parameters, pytest style) in one
  sandbox (``codeworld.sandbox.run_command``: the tree bound read-only at /work, no network,
  a private /tmp, wall/CPU/memory limits), with ``stages/tracer_repo/runner.py`` hooking the
  tracer in: each call made by *test* code into a function of the repository's *package* files
  is one trace, from that function's call frame to its return or exception frame, nested calls
  into other repository functions included (see the runner's docstring). Frames, ``..`` rule,
  reprs and limits are those of ``stages.tracer``.

Records, sorted by (test id, call order within the test)::

    {"id", "repo", "function", "module", "test", "trace", "result", "error", "status",
     "events", "provenance": {"repo", "version", "sha256", "generator": "repository"}}

``status`` is "ok" / "exception" (training data), "too_long" (over ``TraceLimits``: dropped by
CWM) or "invalid" (untraceable, e.g. a generator the test never exhausted).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from codeworld.sandbox import Limits, run_command
from codeworld.sandbox.output import JsonLines
from codeworld.storage import file_sha256
from codeworld.tokens import END_OF_TEXT, TRACE_TOKENS, reserved_token
from codeworld.trace_metrics import parse as parse_trace
from codeworld.sandbox.bwrap import python_install
from stages import tracer, tracer_repo
from stages.tracer import TraceLimits

# Both packages run inside the sandbox, bound by path; imported here (their __init__ only) so
# that the stage's code version (codeworld/code.py) covers them.
TRACER_DIR = Path(tracer.__file__).resolve().parent
RUNNER_DIR = Path(tracer_repo.__file__).resolve().parent
PYPI_SIMPLE_URL = "https://pypi.org/simple"
KEEP = ("ok", "exception")
STATUSES = ("ok", "exception", "too_long", "invalid")
# Reading the run's stdout: the runner writes at most max_traces records and a summary, so
# no more lines than that plus this slack (for lines the suite forges) are parsed; and no
# more of its stderr is kept than its tail (all that is used of it: stats["stderr_tail"]).
READ_SLACK = 1000
STDERR_TAIL_BYTES = 16 << 10
# How the runner's json.dumps begins a record ({"test": ...}) and its summary: no other line is
# parsed, nor counts against the lines that are (a suite's "{" lines before the records took
# them all, and its records were lost).
RECORD_START, SUMMARY_START = b'{"test": ', b'{"summary": '


@dataclass(frozen=True)
class PinnedRepo:
    name: str
    version: str
    sha256: str


# The default repository: a small pure-Python project whose sdist carries a unittest suite
# (~1000 tests, plus the doctests of its recipes module) that runs on the bare interpreter.
DEFAULT_REPOS = (
    PinnedRepo("more-itertools", "10.5.0",
               "5482bfef7849c25dc3c6dd53a6173ae4795da2a41a80faea6700d9f5846c5da6"),
)

# Not part of a repository's package: tests, docs, build scripts.
_TEST_DIRS = frozenset({"test", "tests", "testing", "unittests"})
_SKIP_DIRS = frozenset({"docs", "doc", "examples", "example", "benchmarks", "bench", "build",
                        "dist", "site-packages", "node_modules", "__pycache__"})
_ROOT_SCRIPTS = frozenset({"setup.py", "conftest.py", "noxfile.py", "tasks.py", "fabfile.py",
                           "docs.py", "bootstrap.py"})


# --------------------------------------------------------------------------- fetching


def _sdist_name(name: str, version: str) -> str:
    return f"{name}-{version}.tar.gz"


def _sdist_url(name: str, version: str, sha256: str, index_url: str, timeout: float) -> str:
    """The sdist's URL on the package's page of the simple index (PEP 503, what pip reads):
    the ``.tar.gz`` link of that version whose ``#sha256=`` is the pinned one."""
    norm = re.sub(r"[-_.]+", "-", name).lower()
    page_url = f"{index_url.rstrip('/')}/{norm}/"
    with urllib.request.urlopen(page_url, timeout=timeout) as r:
        page = r.read().decode("utf-8", "replace")
    for href in re.findall(r'href="([^"]+)"', page):
        href = html.unescape(href)
        base, _, frag = href.partition("#")
        fname = base.rsplit("/", 1)[-1]
        if frag == f"sha256={sha256}" and fname.endswith(".tar.gz") and \
                re.sub(r"[-_.]+", "-", fname[:-len(".tar.gz")]).lower() == \
                re.sub(r"[-_.]+", "-", f"{norm}-{version}").lower():
            return urllib.parse.urljoin(page_url, base)
    raise ValueError(f"{page_url}: no sdist {name}=={version} with sha256 {sha256}")




def fetch_pypi_sdist(name: str, version: str, sha256: str, cache_dir: str | os.PathLike, *,
                     index_url: str = PYPI_SIMPLE_URL, timeout: float = 60.0) -> Path:
    """The extracted source tree of ``name==version``'s sdist (``.tar.gz``), downloaded once
    into ``cache_dir`` and checked against ``sha256`` (a mismatch raises ValueError and keeps
    nothing). Nothing of the package runs here."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / f"{name}-{version}"
    marker = dest / ".codeworld-sha256"
    if marker.is_file() and marker.read_text().strip() == sha256:
        return _tree_root(dest)
    archive = cache / _sdist_name(name, version)
    if not archive.is_file() or file_sha256(archive) != sha256:
        url = _sdist_url(name, version, sha256, index_url, timeout)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
                shutil.copyfileobj(r, f)
            got = file_sha256(Path(tmp))
            if got != sha256:
                raise ValueError(f"{url}: sha256 {got} != pinned {sha256}")
            os.replace(tmp, archive)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    with tarfile.open(archive, "r:gz") as tar:
        install_tree(tar, dest, ".codeworld-sha256", sha256)
    return _tree_root(dest)


def install_tree(tar: tarfile.TarFile, dest: Path, marker: str, value: str) -> None:
    """Extract `tar` beside `dest`, make it readable by the sandbox's unprivileged uid, write
    `marker` (what the tree is) and rename it into place: `dest` is complete or absent."""
    work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    try:
        tar.extractall(work, filter="data")
        for p in [work, *work.rglob("*")]:
            if not p.is_symlink():
                p.chmod((p.stat().st_mode | 0o444 | (0o111 if p.is_dir() else 0)) & 0o7755)
        (work / marker).write_text(value + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(work, dest)
    finally:
        if work.exists():
            shutil.rmtree(work)


def _tree_root(dest: Path) -> Path:
    """An sdist holds one top directory ``name-version/``: that is the tree."""
    subs = [p for p in dest.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return subs[0] if len(subs) == 1 and not (dest / "setup.py").exists() else dest


# --------------------------------------------------------------------------- layout


def _is_test_file(rel: Path) -> bool:
    n = rel.name
    return (any(part in _TEST_DIRS for part in rel.parts[:-1]) or n.startswith("test_")
            or n.endswith("_test.py") or n == "conftest.py" or n == "tests.py")


def repo_layout(tree: Path) -> dict:
    """Package files, test files, sys.path entries and discovery roots of a source tree
    (paths relative to the tree; only regular files, no symlinks)."""
    pkg, tests = [], []
    for dirpath, dirnames, filenames in os.walk(tree):
        rel_dir = Path(dirpath).relative_to(tree)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and d not in _SKIP_DIRS and not d.endswith(".egg-info")
                             and not os.path.islink(os.path.join(dirpath, d)))
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            if not fn.endswith(".py") or os.path.islink(full):
                continue
            rel = rel_dir / fn
            if _is_test_file(rel):
                tests.append(rel.as_posix())
            elif not (len(rel.parts) == 1 and fn in _ROOT_SCRIPTS):
                pkg.append(rel.as_posix())
    sys_path = ["/work"]
    if (tree / "src").is_dir():
        sys_path.insert(0, "/work/src")
    starts = [["/work", "/work"]]
    for name in ("tests", "test"):  # a test directory that is not a package: its own root
        d = tree / name
        if d.is_dir() and not d.is_symlink() and not (d / "__init__.py").exists():
            starts.append([f"/work/{name}", f"/work/{name}"])
    return {"pkg_files": pkg, "test_files": tests, "sys_path": sys_path, "start_dirs": starts}


# --------------------------------------------------------------------------- tracing


def _source_token(trace: str) -> str | None:
    """A special token's text in a trace besides the format's own markup: the repository's
    source (a line the frames show) spells one, a chat template's "<|user|>" say. The tracer
    escapes values, not source, and the tokenizer would read it as the token, so the trace is
    not kept (as trace_runner refuses such a program)."""
    for t in TRACE_TOKENS:
        trace = trace.replace(t, "")
    return reserved_token(trace)


def _record_id(repo: str, version: str | None, rec: dict) -> str:
    key = json.dumps([repo, version, rec["test"], rec["seq"], rec["module"], rec["function"]])
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _record_shaped(obj: dict) -> bool:
    """The runner's record: the fields a record is built from (its id among them), of the
    types the runner writes; anything else is not a record, whoever wrote it (its trace is
    checked apart: one not in CWM format is a malformed trace)."""
    return (isinstance(obj.get("test"), str) and type(obj.get("seq")) is int
            and obj.get("status") in STATUSES and isinstance(obj.get("module"), str)
            and isinstance(obj.get("function"), str)
            and all(obj.get(k) is None or isinstance(obj[k], str)
                    for k in ("result", "error"))
            and (obj.get("events") is None or type(obj["events"]) is int))


_SUMMARY_INTS = ("tests_run", "tests_passed", "tests_failed", "tests_errors", "tests_skipped",
                 "expected_failures", "activations")


def _summary_shaped(summary: object) -> bool:
    """The runner's summary: its fields (those present) of the types the runner writes, the
    ones stats and the traces stage read as such."""
    def strs(v) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    untraced = summary.get("tests_untraced", {}) if isinstance(summary, dict) else None
    return (isinstance(summary, dict)
            and all(type(summary.get(k, 0)) is int for k in _SUMMARY_INTS)
            and strs(summary.get("load_errors", [])) and strs(summary.get("functions_seen", []))
            and isinstance(untraced, dict) and all(type(n) is int for n in untraced.values()))


def _read_output(data: bytes | bytearray, *, cut: bool, max_traces: int,
                 limits: TraceLimits) -> tuple[list[dict], dict | None, int, int, int]:
    """The runner's stdout (bytes, ``cut`` at its cap): (records, summary, bad lines,
    malformed traces, traces spelling a special token).

    The suite's own code shares the process that writes these lines and could write lines of
    its own, as many as the output cap holds: a line that does not start with "{" is counted
    as bad without being decoded or parsed, as is one that does not start as the runner's
    records and summary do (RECORD_START, SUMMARY_START) and one longer than any record can
    be; at most ``max_traces`` + 1 + READ_SLACK lines are parsed, after which only the last
    line is, for the summary the runner writes last. A line not parsed counts as bad."""
    # a record's trace is at most max_bytes of UTF-8, up to 6 bytes each in JSON (\u00XX)
    lines = JsonLines(data, cut=cut, max_line_bytes=6 * limits.max_bytes + (1 << 20),
                      starts=(RECORD_START, SUMMARY_START))
    recs, summary, good, malformed, reserved = [], None, 0, 0, 0

    def take(obj) -> None:
        nonlocal summary, good, malformed, reserved
        if isinstance(obj, dict) and set(obj) == {"summary"} and _summary_shaped(obj["summary"]):
            summary = obj["summary"]
            good += 1
        elif isinstance(obj, dict) and _record_shaped(obj):
            good += 1
            # a trace that is not well-formed CWM format is not kept
            trace = obj.get("trace")
            if trace is not None and (not isinstance(trace, str)
                                      or parse_trace(trace + END_OF_TEXT).errors):
                malformed += 1
            elif trace is not None and _source_token(trace):
                reserved += 1
            else:
                recs.append(obj)

    for obj in lines.read(max_traces + 1 + READ_SLACK, last_starts=(SUMMARY_START,)):
        take(obj)
    return recs, summary, lines.lines - good, malformed, reserved


def trace_repository(tree: str | os.PathLike, *, max_traces: int = 500,
                     max_per_function: int = 5, limits: TraceLimits = TraceLimits(),
                     wall_seconds: float = 60.0, memory_mb: int = 2048,
                     repo: str | None = None, version: str | None = None,
                     sha256: str | None = None) -> tuple[list[dict], dict]:
    """Run ``tree``'s test suite in the sandbox under the tracer: (records, stats).

    At most ``max_per_function`` traces per function (the first calls, in test order) and
    ``max_traces`` in all; the whole run is bounded by ``wall_seconds`` (CPU the same), after
    which the traces finished so far are kept and ``stats["timed_out"]`` is True.
    Deterministic for the same tree and parameters."""
    tree = Path(tree).resolve()
    if not tree.is_dir():
        raise NotADirectoryError(tree)
    repo = repo or tree.name
    layout = repo_layout(tree)
    spec = {**layout, "max_traces": max_traces, "max_per_function": max_per_function,
            "limits": {"max_events": limits.max_events, "max_bytes": limits.max_bytes,
                       "max_repr": limits.max_repr}}
    out_cap = min(max(64 << 20, 2 * max_traces * limits.max_bytes), 1 << 30)
    sb_limits = Limits(wall_seconds=wall_seconds, cpu_seconds=wall_seconds,
                       memory_bytes=memory_mb << 20, output_bytes=out_cap, max_processes=32)
    exe = python_install()[0]
    boot = ("import sys; sys.path.insert(0, '/sandbox/lib'); "
            "from cwrepo.runner import main; main()")
    t0 = time.perf_counter()
    # The spec (file lists) goes in a file, not argv: one argument is capped at 128 KiB.
    with tempfile.TemporaryDirectory(prefix="cw-repo-spec-") as spec_dir:
        os.chmod(spec_dir, 0o755)  # readable by the sandbox's unprivileged uid
        spec_file = Path(spec_dir) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        spec_file.chmod(0o644)
        # not -I/-E: they would ignore the sandbox's PYTHONHASHSEED=0 (set and dict orders
        # of str keys would change from run to run); the sandbox's environment is an
        # allow-list.
        res = run_command([exe, "-s", "-P", "-c", boot, "/sandbox/spec/spec.json"],
                          workdir=tree, limits=sb_limits, stderr_tail_bytes=STDERR_TAIL_BYTES,
                          extra_ro_binds=[(TRACER_DIR, "/sandbox/lib/cwtrace"),
                                          (RUNNER_DIR, "/sandbox/lib/cwrepo"),
                                          (spec_dir, "/sandbox/spec")])
    seconds = time.perf_counter() - t0
    recs, summary, bad_lines, malformed, reserved = _read_output(
        res.stdout_bytes, cut=res.stdout_truncated, max_traces=max_traces, limits=limits)
    recs.sort(key=lambda r: (r["test"], r["seq"]))
    provenance = {"repo": repo, "version": version, "sha256": sha256, "generator": "repository"}
    records = [{"id": _record_id(repo, version, r), "repo": repo, "function": r.get("function"),
                "module": r.get("module"), "test": r["test"], "trace": r.get("trace"),
                "result": r.get("result"), "error": r.get("error"), "status": r["status"],
                "events": r.get("events"), "provenance": dict(provenance)} for r in recs]
    summary = summary or {}
    by_status = Counter(r["status"] for r in records)
    stats = {"repo": repo, "version": version,
             "tests_run": summary.get("tests_run"), "tests_passed": summary.get("tests_passed"),
             "tests_failed": summary.get("tests_failed"),
             "tests_errors": summary.get("tests_errors"),
             "tests_skipped": summary.get("tests_skipped"),
             "tests_untraced": summary.get("tests_untraced", {}),
             "load_errors": summary.get("load_errors", []),
             "functions_seen": len(summary.get("functions_seen", [])),
             "functions_traced": len({(r["module"], r["function"]) for r in records}),
             "traces": len(records),
             "traces_by_status": {s: by_status.get(s, 0) for s in STATUSES},
             "completed": summary != {}, "timed_out": res.timed_out,
             "returncode": res.returncode, "bad_lines": bad_lines, "malformed_traces": malformed,
             "reserved_token_traces": reserved,
             "package_files": len(layout["pkg_files"]), "test_files": len(layout["test_files"]),
             "seconds": round(seconds, 2)}
    if not stats["completed"]:
        stats["stderr_tail"] = res.stderr[-2000:]   # (of its last STDERR_TAIL_BYTES)
    return records, stats


def trace_default_repositories(cache_dir: str | os.PathLike = "data/.cache/repos", *,
                               repos: tuple[PinnedRepo, ...] = DEFAULT_REPOS,
                               **kwargs) -> tuple[list[dict], list[dict]]:
    """Fetch (once) and trace every pinned repository: (records, per-repository stats)."""
    records, stats = [], []
    for pin in repos:
        tree = fetch_pypi_sdist(pin.name, pin.version, pin.sha256, cache_dir)
        recs, st = trace_repository(tree, repo=pin.name, version=pin.version, sha256=pin.sha256,
                                    **kwargs)
        records += recs
        stats.append({**st, "pin": asdict(pin)})
    return records, stats


if __name__ == "__main__":  # python -m stages.repo_traces [OUT.jsonl]
    import sys

    recs, st = trace_default_repositories()
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    print(json.dumps(st, indent=1))
