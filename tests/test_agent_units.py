"""Agent stage, the parts that need no sandbox: mutation operators and their inverses, the
tool-call format, budgets, params validation."""
from __future__ import annotations

import ast
import textwrap

import pytest

from codeworld.config import ConfigError, parse_params
from stages.agent.loop import count_tokens
from stages.agent.mutate import OPERATORS, candidate_fixes, mutations, sample, unified_diff
from stages.agent.policies import ScriptedPolicy, call
from stages.agent.tools import EDIT_RE, ToolCall, format_edit, normalise, parse_call, parse_edit, truncate

SRC = textwrap.dedent('''\
    """Module docstring."""
    import re

    LIMIT = 10


    def clamp(x, lo, hi):
        """Keep x in [lo, hi]."""
        if x < lo:
            return lo
        if x > hi:
            return hi
        return x


    def total(xs, start=0):
        acc = start
        for x in xs:
            acc += x
        return acc * 1


    def window(seq, n):
        out = []
        for i in range(len(seq) - n + 1):
            out.append(seq[i:i + n])
        return out


    def words(text, sep=","):
        parts = [p.strip() for p in text.split(sep)]
        keep = True
        if not parts and keep:
            return []
        else:
            return [p for p in parts if p]


    def pick(d, key):
        return d.get(key, None) or re.sub("a", "b", key)
''')


def _line(src: str, no: int) -> str:
    return src.splitlines()[no - 1]


def test_every_operator_fires_and_keeps_the_file_parseable():
    muts = mutations(SRC)
    assert {m.operator for m in muts} == set(OPERATORS)
    for m in muts:
        out = m.apply(SRC)
        assert out != SRC, m
        ast.parse(out)  # never a syntax error
        # module-level code is never mutated: LIMIT and the docstrings stay
        assert "LIMIT = 10" in out and '"""Keep x in [lo, hi]."""' in out


def test_operators_edit_only_their_span():
    muts = {(m.operator, _line(m.apply(SRC), m.line).strip()) for m in mutations(SRC)}
    assert ("flip_comparison", "if x <= lo:") in muts
    assert ("change_arith", "return acc / 1") in muts
    assert ("change_boolop", "if not parts or keep:") in muts
    assert ("negate_condition", "if not x < lo:") not in muts  # wrapped, precedence kept
    assert ("negate_condition", "if not (x < lo):") in muts
    assert ("negate_condition", "if parts and keep:") not in muts
    assert ("off_by_one", "for i in range(len(seq) - n + 1 + 1):") in muts
    assert ("off_by_one", "out.append(seq[i:i + n - 1])") in muts
    assert ("swap_arguments", 'return d.get(key, None) or re.sub("b", "a", key)') in muts
    assert ("swap_arguments", 'return d.get(None, key) or re.sub("a", "b", key)') in muts
    assert ("swap_variable", "return hi") in muts  # `return lo` -> another local
    assert ("change_literal", "keep = False") in muts
    assert ("change_literal", 'def words(text, sep=","):') not in muts  # defaults are not bodies
    removed = [m for m in mutations(SRC) if m.operator == "remove_return"]
    assert all(_line(m.apply(SRC), m.line).strip() == "pass" for m in removed)
    branch = [m for m in mutations(SRC) if m.operator == "remove_branch"]
    assert any("else:" not in m.apply(SRC).split("def words")[1].split("def pick")[0] for m in branch)


def test_sample_is_deterministic_and_covers_operators_in_turn():
    muts = mutations(SRC)
    lines = {m.line for m in muts}
    a = sample(muts, lines, seed=3, limit=11)
    assert a == sample(muts, lines, seed=3, limit=11)
    assert a != sample(muts, lines, seed=4, limit=11)
    assert len({m.operator for m in a}) == 11  # one of each before any operator repeats
    only = sample(muts, {9}, seed=3, limit=50)  # uncovered lines are never drawn
    assert only and all(m.line == 9 for m in only)


def test_candidate_fixes_undo_every_one_line_rewrite():
    """The scripted policy's fixes are the inverse rules: for each single-line mutation that
    does not remove code, the original line is one candidate away from the mutated one."""
    undone = 0
    for m in mutations(SRC):
        if m.operator.startswith("remove_"):
            continue
        bad = m.apply(SRC)
        orig_line, bad_line = _line(SRC, m.line), _line(bad, m.line)
        if bad.count("\n") != SRC.count("\n"):
            continue
        fixes = {new for _, new, _ in candidate_fixes(bad_line)}
        if m.operator == "swap_variable":
            continue  # needs the function's other locals: checked below
        assert orig_line in fixes or orig_line.replace("(", "").replace(")", "") in {
            f.replace("(", "").replace(")", "") for f in fixes}, (m, bad_line, fixes)
        undone += 1
    assert undone > 20
    fn = "def window(seq, n):\n    out = []\n    for i in range(len(seq) - n + 1):\n        out.append(seq[i:n + n])\n"
    assert (4, "        out.append(seq[i:i + n])", "swap_variable") in candidate_fixes(fn)


def test_unified_diff_is_a_patch_of_one_hunk():
    m = next(m for m in mutations(SRC) if m.operator == "flip_comparison")
    diff = unified_diff(m.apply(SRC), SRC, "pkg/mod.py")
    assert diff.startswith("--- a/pkg/mod.py\n+++ b/pkg/mod.py\n@@")
    assert sum(ln.startswith("+") and not ln.startswith("+++") for ln in diff.splitlines()) == 1


def test_tool_call_format():
    assert parse_call("thinking...\n<tool: bash>\nls -la\n</tool>") == ToolCall("bash", "ls -la")
    assert parse_call(call("submit")) == ToolCall("submit", "")
    assert parse_call("no call here").startswith("error: no tool call")
    assert "2 tool calls" in parse_call(call("bash", "ls") + call("bash", "pwd"))
    assert "unknown tool 'python'" in parse_call("<tool: python>\nprint(1)\n</tool>")
    body = parse_call(call("edit", "a.py\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE")).body
    m = EDIT_RE.match(body)
    assert m.groups() == ("a.py", "x = 1", "x = 2")


def test_observation_budget_and_masking():
    text = "head " + "x" * 10_000 + " tail"
    cut = truncate(text, 300)
    assert cut.startswith("head ") and cut.endswith(" tail") and "characters cut" in cut
    assert len(cut) < 400
    assert truncate("short", 300) == "short"
    assert normalise("3 passed in 1.83s\n<Foo at 0x7f3a2b1c9d40>") == "3 passed in 0.00s\n<Foo at 0x?>"
    assert count_tokens("abcd" * 10) == 10 and count_tokens("abcde") == 2


def test_scripted_policy_always_ends_with_submit():
    p = ScriptedPolicy(max_turns=3)
    msgs = [{"role": "system", "content": ""},
            {"role": "user", "content": "Run the tests with: python -m pytest -q\n"}]
    first = p.act(msgs)
    assert first == call("bash", "python -m pytest -q")
    msgs += [{"role": "assistant", "content": first},
             {"role": "tool", "content": "FAILED tests/test_a.py::test_x - assert 1 == 2\n1 failed"}]
    second = p.act(msgs)
    assert second.startswith("<tool: bash>") and "tests/test_a.py::test_x" in second
    msgs += [{"role": "assistant", "content": second}, {"role": "tool", "content": "..."}]
    assert p.act(msgs) == call("submit")  # the turn budget is reached


def test_agent_params_are_validated():
    bad = {"agent": {"repositories": [{"name": "x", "version": "1.0", "sha256": "abc"}]}}
    with pytest.raises(ConfigError, match=r"agent\.repositories\.0.*sha256 'abc'"):
        parse_params(bad, "params.yaml")
    with pytest.raises(ConfigError, match="openai needs openai.base_url"):
        parse_params({"agent": {"policies": ["openai"]}}, "params.yaml")
    with pytest.raises(ConfigError, match="agent.policies.0"):
        parse_params({"agent": {"policies": ["random"]}}, "params.yaml")
    with pytest.raises(ConfigError, match="policies is empty"):
        parse_params({"agent": {"policies": []}}, "params.yaml")
    with pytest.raises(ConfigError, match="commit 'main' is not a commit hash"):
        parse_params({"agent": {"repositories": [{"name": "x", "path": ".", "commit": "main"}]}})
    with pytest.raises(ConfigError, match="agent.max_turnz"):
        parse_params({"agent": {"max_turnz": 3}})
    ok = parse_params({"agent": {"repositories": [{"name": "x", "path": "."}]}})
    assert ok.agent.repositories[0].path == "."
    assert len(parse_params({}).agent.repositories) >= 5


ONE_LINERS = textwrap.dedent('''\
    class Box:
        @property
        def v(self): return self._v

        def get(self, a):
            try: x = 1
            except ValueError: x = 2
            if a: y = 1; z = 2
            else: y = 3
            next(a, None)
            next(a, None)
            return (x + y
                    and z)
''')


def test_mutants_parse_differ_from_the_original_and_from_each_other():
    """Whole-line edits of a statement that shares its line (with its parent's header or
    another statement) once left `def v(self):` without a body, `try:` empty...; two
    rules writing the same text made one bug twice."""
    muts = mutations(ONE_LINERS)
    outs = [m.apply(ONE_LINERS) for m in muts]
    for m, out in zip(muts, outs):
        ast.parse(out)  # never a syntax error
        assert out != ONE_LINERS, m
    assert len(set(outs)) == len(outs)
    # statements that own their lines are still mutated; those sharing one are not
    lines = {(m.operator, m.line) for m in muts}
    assert ("remove_statement", 10) in lines and ("remove_return", 12) in lines
    assert not {("remove_return", 3), ("remove_statement", 6), ("remove_statement", 7),
                ("remove_statement", 8), ("remove_statement", 9)} & lines
    # a boolean operator after a line break is swapped, the break kept
    assert "return (x + y\n                or z)" in "".join(outs)


def test_edit_markers_are_whole_lines_and_one_block_per_call():
    sep = "# ==========\ndef f():\n    return 1"
    assert parse_edit(format_edit("m.py", sep, sep.replace("1", "2"))) == (
        "m.py", sep, sep.replace("1", "2"))
    assert parse_edit("a.py\n<<<<<<< SEARCH\nx = 1\n=======\n>>>>>>> REPLACE") == ("a.py", "x = 1", "")
    two = format_edit("a.py", "x = 1", "x = 2") + "\n" + "\n".join(format_edit("a.py", "y", "z").split("\n")[1:])
    assert parse_edit(two).startswith("error: edit takes one SEARCH/REPLACE block, found 2 lines")
    assert parse_edit("a.py\nx = 1 =======\ny").startswith("error: edit needs the file path")


def test_only_run_to_run_noise_is_masked():
    source = "MASK = 0xFFFFFFFF  # retry in 5s\nID = 0x7f3a2b1c9d40\n"
    assert normalise(source) == source  # a file shown by cat is shown as it is
    assert normalise("==== 1 failed, 2 passed, 1 warning in 75.10s (0:01:15) ====") == \
        "==== 1 failed, 2 passed, 1 warning in 0.00s ===="
    assert normalise("no tests ran in 0.01s") == "no tests ran in 0.00s"
    # pytest's subtests plugin (webcolors' suite): two words to a count; left unmasked, the
    # agent data differed run to run
    assert normalise("1 failed, 37 passed, 7 subtests passed in 0.08s") == \
        "1 failed, 37 passed, 7 subtests passed in 0.00s"
    assert normalise("Ran 3 tests in 0.004s") == "Ran 3 tests in 0.000s"
    assert normalise("E   AssertionError: <pkg.Foo object at 0x7f3a2b1c9d40> != 1") == \
        "E   AssertionError: <pkg.Foo object at 0x?> != 1"
    assert normalise("<function f at 0x7f3a2b1c9d40>") == "<function f at 0x?>"


def test_a_call_ends_at_a_closing_tag_on_a_line_edge():
    c = parse_call("<tool: create>\nnotes.md\nuse </tool> to end a call\nmore\n</tool>")
    assert c == ToolCall("create", "notes.md\nuse </tool> to end a call\nmore")
    assert parse_call("<tool: bash>ls</tool>") == ToolCall("bash", "ls")
    assert parse_call("<tool: submit></tool>") == ToolCall("submit", "")


def test_failing_test_traces_are_held_out_with_their_task(monkeypatch, tmp_path):
    from codeworld.split import corpus_id
    from stages.agent import failing_traces as ft

    rec = {"id": "r1", "test": "test_calc.test_clamp_low", "status": "ok", "module": "calc",
           "trace": "...", "provenance": {"repo": "calc", "version": None}}
    monkeypatch.setattr(ft, "materialise", lambda task, env, dest: dest.mkdir() or dest)
    monkeypatch.setattr(ft, "trace_repository", lambda *a, **k: ([rec], {"tests_run": 1}))
    env = type("E", (), {"test_files": ()})()
    task = {"id": "abc123", "repo": "calc", "operator": "change_arith",
            "FAIL_TO_PASS": ["tests/test_calc.py::test_clamp_low"]}
    recs, _ = ft.failing_test_traces(task, env, max_traces=5, wall_seconds=10)
    assert [corpus_id(r) for r in recs] == ["task:abc123"]  # as the task's trajectories
    assert corpus_id({"task_id": "abc123", "id": "x"}) == "task:abc123"


def test_a_killed_runs_failing_trace_folder_is_swept_at_the_next_start(monkeypatch, tmp_path):
    import os
    import subprocess
    import tempfile

    from stages.agent import failing_traces as ft
    from stages.agent.loop import sweep_orphans

    dead = subprocess.Popen(["true"])
    dead.wait()   # a pid that no process holds now
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(os, "getpid", lambda: dead.pid)   # as if made by that (killed) run
    made = []

    def materialise(task, env, dest):
        made.append(dest.parent)
        raise KeyboardInterrupt   # where a kill -9 would stop it

    monkeypatch.setattr(ft, "materialise", materialise)
    task = {"id": "abc123", "repo": "calc", "FAIL_TO_PASS": ["tests/test_calc.py::test_x"]}
    with pytest.raises(KeyboardInterrupt):
        ft.failing_test_traces(task, type("E", (), {"test_files": ()})(), max_traces=1,
                               wall_seconds=1)
    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (made[0] / "buggy").mkdir(parents=True)   # what -9 leaves (no cleanup ran)
    assert sweep_orphans() == 1 and not made[0].exists()


def test_a_killed_runs_sandbox_spec_folder_is_swept_at_the_next_start(monkeypatch, tmp_path):
    """Each sandbox call's spec folder (a mutants run's holds every mutant's source) is left
    behind by a kill -9: the next start must find it as a dead run's and remove it."""
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    from stages.agent import envs
    from stages.agent.loop import sweep_orphans

    dead = subprocess.Popen(["true"])
    dead.wait()   # a pid that no process holds now
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(os, "getpid", lambda: dead.pid)   # as if made by that (killed) run
    monkeypatch.setattr(envs, "pytest_binds", lambda: [])
    made = []

    def run_command(argv, *, extra_ro_binds, **kwargs):
        made.append(Path(dict((b, a) for a, b in extra_ro_binds)[envs.SANDBOX_SPEC]))
        raise KeyboardInterrupt   # where a kill -9 would stop it

    monkeypatch.setattr(envs, "run_command", run_command)
    env = envs.Env("calc", tmp_path)
    with pytest.raises(KeyboardInterrupt):
        envs.run_mutants(tmp_path, env, [{"id": "0", "file": "m.py", "source": "x = 1\n",
                                          "tests": None}], timeout=1, wall_seconds=1)
    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made[0].mkdir()
    (made[0] / "spec.json").write_text("{}")   # what -9 leaves (no cleanup ran)
    assert sweep_orphans() == 1 and not made[0].exists()


def test_truncate_keeps_exactly_its_budget():
    assert truncate("abcdef", 6) == "abcdef"
    assert truncate("abcdefghij", 6) == "ab\n[... 4 characters cut ...]\nghij"
    assert "abcdef" not in truncate("abcdef", 0)   # text[-0:] was the whole text


def test_reward_check_counts_a_sandbox_error_and_stops_without_a_sandbox(monkeypatch, tmp_path):
    # a misbehaving sandbox costs one task; no sandbox at all stops the stage with its hint
    from codeworld.sandbox import SandboxError, SandboxUnavailable
    from stages.agent import validate

    monkeypatch.setattr(validate, "materialise", lambda task, env, dest: dest)
    env = __import__("types").SimpleNamespace(tree=tmp_path)
    for exc, want in ((SandboxError("bad"), "reward_check_error"),
                      (SandboxUnavailable("none"), SandboxUnavailable)):
        def evaluate(*args, exc=exc, **kwargs):
            raise exc
        monkeypatch.setattr(validate, "evaluate", evaluate)
        if isinstance(want, str):
            assert validate.reward_check({}, env, wall_seconds=1) == want
        else:
            with pytest.raises(want):
                validate.reward_check({}, env, wall_seconds=1)


def _git_repo(root, files: dict, links: dict = {}):
    """A git repository at ``root`` with one commit of ``files`` (and symlinks ``links``)."""
    import os
    import subprocess

    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                              text=True, env=env).stdout.strip()
    root.mkdir(parents=True)
    for rel, text in files.items():
        (root / rel).write_text(text)
    for rel, target in links.items():
        (root / rel).symlink_to(target)
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    return git, git("rev-parse", "HEAD")


def test_a_repository_whose_tree_cannot_be_made_is_recorded_by_name(monkeypatch, tmp_path):
    # (these escaped build_repo and stopped the whole stage without naming the repository)
    import subprocess
    from types import SimpleNamespace

    import stages.agent as agent
    from stages.agent import envs

    monkeypatch.setattr(agent, "REPO_CACHE", str(tmp_path / "cache"))
    cfg = parse_params({"agent": {"repositories": [{"name": "x", "path": "."}]}}).agent

    def repo(name, path, commit):
        return SimpleNamespace(name=name, path=str(path), commit=commit, version=None, sha256=None)

    def reason(r):
        tasks, trajs, traces, meta = agent.build_repo(r, cfg)
        assert (tasks, trajs, traces) == ([], [], []) and meta["validation"]["valid"] is False
        return meta["validation"]["reason"]

    # a symlink to a host file in the committed tree: the extraction refuses it
    _, commit = _git_repo(tmp_path / "linked", {"m.py": "x = 1\n"}, {"host": "/etc/hostname"})
    why = reason(repo("linked", tmp_path / "linked", commit))
    assert why.startswith("agent.repositories[linked]: ") and "AbsoluteLinkError" in why, why

    # a blob of the commit's tree is gone: git archive fails; git's own words are kept
    git, commit = _git_repo(tmp_path / "holed", {"m.py": "x = 1\n", "n.py": "y = 2\n"})
    blob = git("rev-parse", f"{commit}:n.py")
    (tmp_path / "holed" / ".git" / "objects" / blob[:2] / blob[2:]).unlink()
    why = reason(repo("holed", tmp_path / "holed", commit))
    assert why.startswith("agent.repositories[holed]: ") and "git archive" in why, why
    assert blob in why or "unable to read" in why, why

    # git that does not answer in time
    def slow(argv, **kwargs):
        raise subprocess.TimeoutExpired(argv, kwargs.get("timeout"))
    monkeypatch.setattr(envs.subprocess, "run", slow)
    why = reason(repo("slow", tmp_path / "holed", commit))
    assert why.startswith("agent.repositories[slow]: ") and "TimeoutExpired" in why, why
    monkeypatch.undo()

    # an outage is no property of the repository: it still stops the stage (a rerun resumes)
    monkeypatch.setattr(agent, "build_env", lambda r, cache: (_ for _ in ()).throw(
        ConnectionError("index down")))
    with pytest.raises(ConnectionError, match=r"agent.repositories\[x\]: cannot fetch"):
        agent.build_repo(repo("x", tmp_path, None), cfg)


def test_a_name_the_package_index_does_not_know_is_recorded_not_retried(monkeypatch, tmp_path):
    """A 404 from the index (a mistyped project name) is a bad pin, recorded by name; it was a
    ConnectionError: exit 75, and the flow retried it as an outage. A 503 still is one."""
    import functools
    import http.server
    import threading
    from types import SimpleNamespace

    import stages.agent as agent
    from stages.agent import envs

    status = {"code": 404}

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(status["code"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = f"http://127.0.0.1:{server.server_address[1]}/simple"
        monkeypatch.setattr(envs, "fetch_pypi_sdist",
                            functools.partial(envs.fetch_pypi_sdist, index_url=index, timeout=10))
        monkeypatch.setattr(agent, "REPO_CACHE", str(tmp_path / "cache"))
        cfg = parse_params({"agent": {"repositories": [{"name": "x", "path": "."}]}}).agent
        repo = SimpleNamespace(name="attrz", version="1.0", sha256="0" * 64, path=None, commit=None)
        *parts, meta = agent.build_repo(repo, cfg)
        assert parts == [[], [], []] and meta["validation"]["valid"] is False
        assert meta["validation"]["reason"].startswith(
            f"agent.repositories[attrz]: {index}/attrz/: HTTP 404 (no such project"), meta
        status["code"] = 503
        with pytest.raises(ConnectionError, match=r"agent.repositories\[attrz\]: cannot fetch"):
            agent.build_repo(repo, cfg)
    finally:
        server.shutdown()


class _FakeRepos:
    """build_repo stand-in: each repository gives one task and one trajectory after a short
    while; the ones named in ``fail`` raise an outage at once. Records the calls."""

    def __init__(self, fail=()):
        self.fail, self.calls = set(fail), []

    def __call__(self, repo, cfg):
        import time

        self.calls.append(repo.name)
        if repo.name in self.fail:
            raise ConnectionError(f"agent.repositories[{repo.name}]: cannot fetch: down")
        time.sleep(0.3)
        meta = {"repo": repo.name, "tried": {}, "valid": {}, "kept": {}, "rejected": {},
                "episodes": [], "traces": 0, "broken_traces": 0, "seconds": 0.3,
                "validation": {"repo": repo.name, "valid": True}}
        return [{"id": repo.name}], [{"id": f"{repo.name}-t"}], [], meta


def _stage(tmp_path, root: str, workers: int, fake, monkeypatch):
    """Run the agent stage over three repositories a, b, c with ``fake`` building them."""
    import stages.agent as agent

    monkeypatch.setattr(agent, "build_repo", fake)
    # the stage pins its manifests in data/agent/ of the working folder (DVC's outputs): here,
    # not the repository's, whose pipeline data they would replace
    monkeypatch.chdir(tmp_path)
    params = parse_params({"storage": {"root": str(tmp_path / root)}, "agent": {
        "repositories": [{"name": n, "path": str(tmp_path)} for n in "abc"], "workers": workers}})
    return agent.run(params, track=False, metrics_path=str(tmp_path / f"{root}.json"))


def _manifests(tmp_path, root: str) -> list[bytes]:
    return [(tmp_path / root / "agent" / n / "manifest.json").read_bytes()
            for n in ("tasks", "trajectories", "traces")]


def test_repositories_finished_before_an_outage_are_written(monkeypatch, tmp_path):
    # (the stage raised at the first failed repository in order and never wrote the others
    # it waited for: a rerun redid them all)
    _stage(tmp_path, "straight", 3, _FakeRepos(), monkeypatch)
    fake = _FakeRepos(fail={"a"})
    with pytest.raises(ConnectionError, match=r"repositories\[a\]"):
        _stage(tmp_path, "out", 3, fake, monkeypatch)
    shards = tmp_path / "out" / "agent" / "tasks"
    assert sorted(p.name for p in shards.glob("shard-*")) == ["shard-00001.tar", "shard-00002.tar"]
    again = _FakeRepos()
    _stage(tmp_path, "out", 3, again, monkeypatch)
    assert again.calls == ["a"]   # b and c were kept
    # shard index = repository index: the same datasets as a run that never stopped
    assert _manifests(tmp_path, "out") == _manifests(tmp_path, "straight")

    # one at a time: the repositories not started are cancelled, not built for nothing
    fake = _FakeRepos(fail={"a"})
    with pytest.raises(ConnectionError):
        _stage(tmp_path, "serial", 1, fake, monkeypatch)
    assert fake.calls == ["a"]


def test_a_run_killed_between_the_datasets_finishes_redoes_nothing(monkeypatch, tmp_path):
    from codeworld.shards import DatasetWriter

    _stage(tmp_path, "straight", 2, _FakeRepos(), monkeypatch)
    finish = DatasetWriter.finish

    def killed(self, infos, extra=None):   # tasks finish, then the run dies
        if self.name.endswith("trajectories"):
            raise KeyboardInterrupt
        return finish(self, infos, extra)

    for root, damage in (("out", None), ("damaged", "traces")):
        with monkeypatch.context() as mp:
            mp.setattr(DatasetWriter, "finish", killed)
            with pytest.raises(KeyboardInterrupt):
                _stage(tmp_path, root, 2, _FakeRepos(), mp)
        assert (tmp_path / root / "agent" / "tasks" / "manifest.json").exists()
        if damage:   # one record of an unfinished dataset lost: that repository only is redone
            (tmp_path / root / ".work" / "agent" / damage / "shard-00001.tar.json").unlink()
        again = _FakeRepos()
        _stage(tmp_path, root, 2, again, monkeypatch)
        assert again.calls == ([] if damage is None else ["b"])
        assert _manifests(tmp_path, root) == _manifests(tmp_path, "straight")
