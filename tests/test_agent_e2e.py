"""Agent stage end to end on a small local git repository built here: environment validation,
bug synthesis, the scripted and openai policies (the latter against a real chat-completions
server on loopback), the reward both ways, containment of hostile actions, and the stage."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from codeworld.config import parse_params
from codeworld.shards import Dataset
from codeworld.storage import Storage
from stages.agent.envs import build_env
from stages.agent.failing_traces import failing_test_traces
from stages.agent.loop import run_episode
from stages.agent.mutate import mutations
from stages.agent.policies import STOPS, OpenAIPolicy, PolicyUnavailable, ScriptedPolicy, call
from stages.agent.reward import canary_order, evaluate, materialise, write_canary
from stages.agent.tools import ToolCall, execute, format_edit, parse_call
from stages.agent.validate import baseline, check_mutants, coverage_map

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None and not os.environ.get("CI"),
                                reason="bubblewrap not installed")

CALC = '''\
def clamp(x, lo, hi):
    if x < lo:
        return lo
    if x > hi:
        return hi
    return x


def mean(xs):
    total = 0
    for x in xs:
        total += x
    return total / len(xs)


def window(seq, n):
    return [seq[i:i + n] for i in range(len(seq) - n + 1)]
'''

TESTS = '''\
import unittest

from calc import clamp, mean, window


def test_clamp_low():
    assert clamp(-5, 0, 10) == 0


def test_clamp_high():
    assert clamp(50, 0, 10) == 10


def test_clamp_inside():
    assert clamp(5, 0, 10) == 5


def test_mean():
    assert mean([1, 2, 3, 6]) == 3


class TestWindow(unittest.TestCase):
    def test_pairs(self):
        self.assertEqual(window([1, 2, 3], 2), [[1, 2], [2, 3]])
'''

SMALL = dict(max_turns=24, max_tokens=20000, observation_chars=3000, tool_wall_seconds=30,
             test_wall_seconds=60)


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env=env).stdout.strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("calc-repo")
    (root / "calc").mkdir()
    (root / "calc" / "__init__.py").write_text(CALC)
    (root / "tests").mkdir()
    (root / "tests" / "test_calc.py").write_text(TESTS)
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "calc")
    commit = _git(root, "rev-parse", "HEAD")
    (root / "calc" / "__init__.py").write_text("broken = (\n")  # the work tree is never read
    return root, commit


class _Repo:
    def __init__(self, name, path, commit):
        self.name, self.path, self.commit, self.version, self.sha256 = name, path, commit, None, None


@pytest.fixture(scope="module")
def env(repo, tmp_path_factory):
    root, commit = repo
    return build_env(_Repo("calc", str(root), commit), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def validated(env):
    validation, base = baseline(env, 60)
    return validation, base, coverage_map(base)


def _task(env, validated, operator: str, line_text: str, stats: dict | None = None) -> dict | None:
    """The task of one hand-picked mutation, validated like the stage's (None: rejected)."""
    _, base, covering = validated
    source = (env.tree / "calc/__init__.py").read_text()
    m = next(m for m in mutations(source) if m.operator == operator
             and m.apply(source).splitlines()[m.line - 1].strip() == line_text)
    stats = stats if stats is not None else {"tried": Counter(), "kept": Counter(), "rejected": Counter()}
    tasks = check_mutants(env, base, covering, {"calc/__init__.py": source},
                          [("calc/__init__.py", m)], seed=0, max_tasks=1, batch=1,
                          mutant_timeout=30, wall_seconds=60, stats=stats)
    return tasks[0] if tasks else None


def test_environment_from_a_pinned_commit_is_validated(env, validated):
    validation, base, covering = validated
    assert env.commit and len(env.commit) == 40
    assert (env.tree / "calc/__init__.py").read_text() == CALC  # the commit, not the work tree
    assert validation["valid"] and validation["tests"] == 5 == validation["passed"]
    assert "tests/test_calc.py::TestWindow::test_pairs" in base.passed  # unittest under pytest
    # line 2 (`if x < lo:`) is run by the three clamp tests only, listed in the suite's order
    assert covering[("calc/__init__.py", 2)] == [
        f"tests/test_calc.py::test_clamp_{k}" for k in ("low", "high", "inside")]


def test_a_failing_suite_is_recorded_and_skipped(tmp_path):
    tree = tmp_path / "bad"
    (tree / "tests").mkdir(parents=True)
    (tree / "mod.py").write_text("def f():\n    return 1\n")
    (tree / "tests" / "test_mod.py").write_text(
        "from mod import f\n\ndef test_f():\n    assert f() == 2\n\ndef test_g():\n    assert f() == 1\n")
    bad_env = build_env(_Repo("bad", str(tree), None), tmp_path / "cache")
    validation, _ = baseline(bad_env, 60)
    assert not validation["valid"]
    assert validation["failed"] == ["tests/test_mod.py::test_f"]
    assert "1 failing tests" in validation["reason"]


def test_bug_instance_fail_to_pass_pass_to_pass_and_statement(env, validated):
    # no test has x == lo: `<=` for `<` changes nothing the tests see, so it is not a bug
    stats = {"tried": Counter(), "kept": Counter(), "rejected": Counter()}
    assert _task(env, validated, "flip_comparison", "if x <= lo:", stats) is None
    assert stats["rejected"] == {"no_fail_to_pass": 1} and stats["tried"] == {"flip_comparison": 1}

    task = _task(env, validated, "negate_condition", "if not (x < lo):")
    assert task["FAIL_TO_PASS"] == sorted(f"tests/test_calc.py::test_clamp_{k}"
                                          for k in ("high", "inside", "low"))
    assert task["PASS_TO_PASS"] == ["tests/test_calc.py::TestWindow::test_pairs",
                                    "tests/test_calc.py::test_mean"]
    assert task["gold_patch"].count("\n+    if x < lo:") == 1
    assert task["bug_patch"].count("\n+    if not (x < lo):") == 1
    st = task["problem_statement"]
    for t in task["FAIL_TO_PASS"]:
        assert t in st
    assert "x < lo" not in st and "x <= lo" not in st  # nothing of the fix, no package frame
    assert "Run the tests with: python -m pytest" in st


def test_reward_both_ways_and_hostile_actions_are_contained(env, validated, tmp_path):
    task = _task(env, validated, "change_arith", "return total * len(xs)")
    buggy = materialise(task, env, tmp_path / "buggy")
    work = tmp_path / "work"
    shutil.copytree(buggy, work)
    # the hidden tests cannot be edited away (the test file is restored from the task) nor
    # skipped by a conftest the agent adds: with the bug still in, the reward stays 0
    hack = execute(ToolCall("create", "tests/test_calc.py\ndef test_mean():\n    pass\n"), work, env,
                   wall_seconds=30)
    assert hack.startswith("created")
    execute(ToolCall("create", "conftest.py\nimport pytest\ncollect_ignore = ['tests']\n"), work,
            env, wall_seconds=30)
    assert evaluate(task, env, buggy, work, wall_seconds=60)["reward"] == 0.0

    # leaving the sandbox: writes outside the working copy fail, host files are not visible
    outside = tmp_path / "escape.txt"
    obs = execute(ToolCall("bash", f"echo pwned > {outside}; cat /etc/hostname; ls /root; "
                                   f"echo done"), work, env, wall_seconds=30)
    assert not outside.exists() and "done" in obs
    obs = execute(ToolCall("create", "../../escape.txt\npwned\n"), work, env, wall_seconds=30)
    assert obs.startswith("error") and not (tmp_path / "escape.txt").exists()
    # (an absolute path lands in the sandbox's private /tmp, gone with the sandbox)
    execute(ToolCall("create", f"{outside}\npwned\n"), work, env, wall_seconds=30)
    assert not outside.exists()

    # the right fix scores 1, even with the hostile edits above still in the working copy
    res = execute(ToolCall("edit", format_edit("calc/__init__.py", "return total * len(xs)",
                                               "return total / len(xs)")), work, env, wall_seconds=30)
    assert res.startswith("edited calc/__init__.py")
    result = evaluate(task, env, buggy, work, wall_seconds=60)
    assert result["reward"] == 1.0, result
    # a wrong fix scores 0
    execute(ToolCall("edit", format_edit("calc/__init__.py", "return total / len(xs)",
                                         "return total // len(xs) + 1")), work, env, wall_seconds=30)
    assert evaluate(task, env, buggy, work, wall_seconds=60)["reward"] == 0.0


class _Replies:
    """A policy that replays fixed assistant turns (then submits)."""

    def __init__(self, replies):
        self.replies = list(replies)

    def act(self, messages):
        return self.replies.pop(0) if self.replies else call("submit")


FORGE = """
import json as _j, os as _os
for _fd in range(1, 10):   # every descriptor a result channel could be
    for _t in {tests!r}:
        try:
            _os.write(_fd, (_j.dumps({{"test": _t, "outcome": "pass", "message": ""}}) + "\\n").encode())
        except OSError:
            pass
_os._exit(0)
"""
PATCH_PYTEST = """
import _pytest.python as _pp
_pp.Function.runtest = lambda self: None   # every test 'passes'
"""


def test_forged_outcomes_and_links_out_of_the_copy_earn_nothing(env, validated, tmp_path):
    """The package code runs in the process that reports the outcomes: canaries catch a
    forgery; a linked folder cannot bring the host's (clean) package into the tested tree."""
    task = _task(env, validated, "change_arith", "return total * len(xs)")
    buggy = materialise(task, env, tmp_path / "buggy")
    hidden = [*task["FAIL_TO_PASS"], *task["PASS_TO_PASS"]]
    found = []
    for hack in (FORGE.format(tests=hidden), PATCH_PYTEST):
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(buggy, work)
        with open(work / "calc" / "__init__.py", "a") as f:
            f.write(hack)
        result = evaluate(task, env, buggy, work, wall_seconds=60)
        assert result["reward"] == 0.0, result
        found.append(sorted(result["summary"]["tampered"].values()))
    # forged lines with no canary among them: the canaries missing; pytest patched to pass
    # plain functions: the function canary that must fail passed
    assert found[0] == ["missing"] * 4
    assert found[1] == ["fail", "pass", "pass", "pass"]

    # the package folder replaced by a link to the host's clean copy of it: not followed
    work = tmp_path / "work"
    shutil.rmtree(work)
    shutil.copytree(buggy, work)
    shutil.rmtree(work / "calc")
    (work / "calc").symlink_to(env.tree / "calc")
    result = evaluate(task, env, buggy, work, wall_seconds=60)
    assert result["reward"] == 0.0 and "tampered" not in result["summary"]
    # and the honest fix still earns its reward beside the canaries
    shutil.rmtree(work)
    shutil.copytree(buggy, work)
    fixed = (work / "calc" / "__init__.py").read_text().replace("return total * len(xs)",
                                                                "return total / len(xs)")
    (work / "calc" / "__init__.py").write_text(fixed)
    result = evaluate(task, env, buggy, work, wall_seconds=60)
    assert result["reward"] == 1.0 and "tampered" not in result["summary"], result


NAME_AWARE = """
import _pytest.python as _pp
_run = _pp.Function.runtest
def _runtest(self, _run=_run):
    if "fail" in self.name:   # a test named to fail runs as it is: every other one passes
        return _run(self)
_pp.Function.runtest = _runtest
"""


def test_a_forgery_cannot_tell_the_canaries_apart(env, validated, tmp_path):
    """Package code that passes every test but those whose names say they must fail: the
    canaries' names said so (test_fails_...), and it earned the reward with the bug left in."""
    task = _task(env, validated, "change_arith", "return total * len(xs)")
    buggy = materialise(task, env, tmp_path / "buggy")
    work = tmp_path / "work"
    shutil.copytree(buggy, work)
    with open(work / "calc" / "__init__.py", "a") as f:
        f.write(NAME_AWARE)
    result = evaluate(task, env, buggy, work, wall_seconds=60)
    assert result["reward"] == 0.0 and "tampered" in result["summary"], result
    # the canaries: the same for the same task, nothing in a name, one of each kind either side
    holds, fails = write_canary(task, tmp_path)
    assert (holds, fails) == write_canary(task, tmp_path)
    assert not any(w in t for t in holds + fails for w in ("hold", "fail", "pass"))
    before, after = canary_order(holds, fails)
    assert {len(set(before) & set(holds)), len(set(after) & set(holds))} == {1}


def test_a_working_copy_grown_past_its_limit_ends_the_episode(env, validated):
    task = _task(env, validated, "change_arith", "return total * len(xs)")
    big = call("bash", "for i in 1 2 3; do head -c 1000000 /dev/zero > blob$i; done; echo ok")
    ep = run_episode(task, env, _Replies([call("bash", "ls"), big, call("bash", "ls")]),
                     **{**SMALL, "max_workdir_mb": 2})
    assert ep["stop_reason"] == "workdir_limit" and ep["turns"] == 2 and not ep["submitted"]
    assert ep["reward"] == 0.0
    # the quota held within the call: the third blob did not fit
    last = ep["messages"][-1]["content"]
    assert "No space left on device" in last and "\nok\n\n[exit code 0]" in last, last
    assert last.endswith("[error: the working copy is full, at its limit of 2 MB "
                         "(agent.max_workdir_mb): the episode ends]")


def test_malformed_edit_and_create_calls_are_observations_not_failures(env, validated):
    # (the episode loop once failed on them: AttributeError, a broken RL episode)
    task = _task(env, validated, "change_arith", "return total * len(xs)")
    ep = run_episode(task, env, _Replies([call("edit", "calc/__init__.py\nno markers"),
                                          call("create", "\nno path"), call("bash", "echo on")]),
                     **SMALL)
    tools = [m["content"] for m in ep["messages"] if m["role"] == "tool"]
    assert tools[0].startswith("error: edit needs the file path on the first line")
    assert tools[1] == "error: create needs the file path on the first line, then the content"
    assert tools[2] == "on\n\n[exit code 0]" and ep["stop_reason"] == "submit"


def test_scripted_policy_fixes_a_bug_from_observations_only(env, validated):
    task = _task(env, validated, "swap_variable", "return hi")  # `return lo` in clamp
    ep = run_episode(task, env, ScriptedPolicy(SMALL["max_turns"]), **SMALL)
    roles = [m["role"] for m in ep["messages"]]
    assert roles[:2] == ["system", "user"] and set(roles[2:]) <= {"assistant", "tool"}
    for m in ep["messages"]:
        if m["role"] == "assistant":
            assert m["content"].count("<tool: ") == 1 and m["content"].rstrip().endswith("</tool>")
    # the gold patch never reached the policy: only the problem statement and observations
    assert task["gold_patch"] not in json.dumps(ep["messages"])
    assert ep["submitted"] and ep["stop_reason"] == "submit"
    assert ep["reward"] == 1.0, [m["content"][:200] for m in ep["messages"]]
    assert 4 <= ep["turns"] <= SMALL["max_turns"]

    # the failing test, executed under the repository tracer: the bug shows in the trace
    recs, stats = failing_test_traces(task, env, max_traces=5, wall_seconds=60)
    assert stats["traceable_tests"] == 1 and [r["test"] for r in recs] == ["test_calc.test_clamp_low"]
    trace = recs[0]["trace"]
    assert trace.startswith('<|call_sep|>{"x": "-5", "lo": "0", "hi": "10"}<|action_sep|>def clamp(x, lo, hi):')
    assert trace.endswith('<|return_sep|><|action_sep|>        return hi\n<|arg_sep|>"10"<|frame_sep|>')
    assert recs[0]["task_id"] == task["id"] and recs[0]["provenance"]["generator"] == "agent_failing_test"


class _ChatServer:
    """A real HTTP server on loopback speaking the chat-completions API. Its "model" replays a
    fixed list of assistant turns and records every request."""

    def __init__(self, replies: list[str], status: int = 200):
        self.replies, self.requests, self.status = list(replies), [], status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body,
                                       "auth": self.headers.get("Authorization")})
                if outer.status != 200:
                    self.send_response(outer.status)
                    self.end_headers()
                    self.wfile.write(b'{"error": "overloaded"}')
                    return
                text = outer.replies.pop(0) if outer.replies else call("submit")
                # a real server stops before the first stop sequence it writes, or where the
                # reply reaches max_tokens (here 4 characters a token, as loop.count_tokens)
                cuts = [i for i in (text.find(st) for st in body["stop"]) if i >= 0]
                budget, finish = 4 * body["max_tokens"], "stop"
                if cuts and min(cuts) <= budget:
                    text = text[:min(cuts)]
                elif len(text) > budget:
                    text, finish = text[:budget], "length"
                data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": finish,
                                                "message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_openai_policy_keeps_a_tool_end_inside_a_files_line():
    # the server stopped at the first "</tool>" it wrote: a file content that mentions it was
    # cut there. Only a "</tool>" that starts or ends a line ends a call (tools.CALL_RE).
    content = "notes.md\nwrite </tool> to end a call\nthe end"
    with _ChatServer([call("create", content), "thinking\n" + call("bash", "ls</tool>")]) as srv:
        policy = OpenAIPolicy(srv.url, "tiny-model", max_tokens=256)
        first = policy.act([{"role": "user", "content": "go"}])
        second = policy.act([{"role": "user", "content": "go"}])
    assert parse_call(first) == ToolCall("create", content)
    assert parse_call(second) == ToolCall("bash", "ls")


def test_openai_policy_runs_no_call_cut_at_max_tokens():
    # the reply reached max_tokens inside a create: with its end put back, half a file was
    # written; unfinished, it is no call, and the agent is told so as for any bad call
    half = call("create", "big.py\n" + "x = 1\n" * 100)
    with _ChatServer([half, call("bash", "ls")]) as srv:
        policy = OpenAIPolicy(srv.url, "tiny-model", max_tokens=32)
        cut = policy.act([{"role": "user", "content": "go"}])
        whole = policy.act([{"role": "user", "content": "go"}])
    assert half.startswith(cut) and len(cut) == 128 and "</tool>" not in cut
    assert parse_call(cut).startswith("error: no tool call found")
    assert parse_call(whole) == ToolCall("bash", "ls")  # stopped at its end: put back


def test_openai_policy_against_a_local_chat_server(env, validated, monkeypatch):
    task = _task(env, validated, "change_arith", "return total * len(xs)")
    fix = format_edit("calc/__init__.py", "return total * len(xs)", "return total / len(xs)")
    replies = ["Let me look.\n" + call("bash", "grep -n 'total' calc/__init__.py"),
               "no tool call in this turn",
               call("edit", fix), call("submit")]
    monkeypatch.setenv("CW_TEST_KEY", "sk-local")
    with _ChatServer(replies) as srv:
        policy = OpenAIPolicy(srv.url, "tiny-model", api_key_env="CW_TEST_KEY", max_tokens=256)
        ep = run_episode(task, env, policy, **SMALL)
    assert ep["reward"] == 1.0 and ep["turns"] == 4 and ep["submitted"]
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-local"
    assert req["body"]["model"] == "tiny-model" and req["body"]["stop"] == STOPS
    assert [m["role"] for m in req["body"]["messages"]] == ["system", "user"]
    assert "total" in ep["messages"][3]["content"]  # the grep's output came back as a turn
    assert ep["messages"][5]["content"].startswith("error: no tool call")
    last = srv.requests[-1]["body"]["messages"]
    assert [m["role"] for m in last[2:]] == ["assistant", "user"] * 3  # tool results as turns

    # a server that keeps failing (after its retries), or none at all, is no episode: the
    # stage stops and a rerun resumes; a request the server refuses ends the episode
    with _ChatServer([], status=503) as srv:
        with pytest.raises(PolicyUnavailable, match=r"HTTP 503.*\(3 tries\)"):
            run_episode(task, env, OpenAIPolicy(srv.url, "m", retries=2, backoff=0.01), **SMALL)
        assert len(srv.requests) == 3
    with pytest.raises(PolicyUnavailable, match="Connection refused"):
        run_episode(task, env, OpenAIPolicy("http://127.0.0.1:9/v1", "m", retries=0), **SMALL)
    with _ChatServer([], status=400) as srv:
        ep = run_episode(task, env, OpenAIPolicy(srv.url, "m", retries=2, backoff=0.01), **SMALL)
    assert ep["stop_reason"] == "policy_error" and "HTTP 400" in ep["error"] and ep["reward"] == 0.0
    assert len(srv.requests) == 1


def test_stage_end_to_end(repo, tmp_path, monkeypatch):
    root, commit = repo
    params = parse_params({
        "storage": {"root": str(tmp_path / "data")},
        "agent": {"repositories": [{"name": "calc", "path": str(root), "commit": commit},
                                   {"name": "gone", "path": str(tmp_path / "missing")}],
                  "max_mutants_per_repo": 3, "max_tasks_per_repo": 1, "mutant_batch": 3,
                  "max_turns": 6, "workers": 1}})
    from stages.agent import run

    monkeypatch.chdir(tmp_path)  # the sdist/git cache (.cache/repos) goes here
    metrics_path = str(tmp_path / "metrics" / "agent.json")
    m = run(params, track=False, metrics_path=metrics_path)
    tasks = list(Dataset(Storage(str(tmp_path / "data")).sub("agent", "tasks")))
    trajs = list(Dataset(Storage(str(tmp_path / "data")).sub("agent", "trajectories")))
    metrics = json.loads(Path(metrics_path).read_text())
    traces = list(Dataset(Storage(str(tmp_path / "data")).sub("agent", "traces")))
    assert m["records"] == len(trajs) == len(tasks) >= 1 and m["tasks"] == len(tasks)
    assert m["traces"] == len(traces) == metrics["failing_test_traces"]
    assert all(r["task_id"] in {t["id"] for t in tasks} and r["trace"].startswith("<|call_sep|>")
               for r in traces)
    assert metrics["repos"] == 2 and metrics["repos_valid"] == 1 and metrics["validation_yield"] == 0.5
    assert metrics["tasks_calc"] == len(tasks) and metrics["tasks_gone"] == 0
    assert metrics["mutants_tried"] == 3 and metrics["mutants_valid"] >= len(tasks)
    assert metrics["mutants_tried"] == sum(metrics[f"tried_{op}"] for op in
                                           {k[6:] for k in metrics if k.startswith("tried_")})
    assert metrics["episodes_scripted"] == len(trajs)
    assert metrics["success_rate_scripted"] == sum(t["reward"] for t in trajs) / len(trajs)
    assert metrics["mean_turns_scripted"] > 0
    for t in tasks:
        assert t["repo"] == "calc" and t["commit"] == commit and t["FAIL_TO_PASS"] and t["PASS_TO_PASS"]
    for t in trajs:
        assert t["task"]["id"] in {x["id"] for x in tasks} and t["reward"] in (0.0, 1.0)
        assert t["messages"][0]["role"] == "system"
    report = json.loads((tmp_path / "data" / "agent" / "tasks" / "manifest.json").read_text())["stats"]
    gone = next(r for r in report["repositories"] if r["repo"] == "gone")
    assert not gone["validation"]["valid"] and "not a directory" in gone["validation"]["reason"]
    # finished: a rerun does nothing and returns the same datasets
    again = run(params, track=False, metrics_path=metrics_path)
    assert again == m and len(m["datasets"]["tasks"]) == 2


def test_episode_folders_of_killed_runs_are_swept(tmp_path, monkeypatch):
    import tempfile

    from stages.agent.loop import sweep_orphans

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"cw-agent-{dead.pid}-abc" / "work").mkdir(parents=True)   # a stage killed -9
    (tmp_path / f"cw-agent-{os.getpid()}-def").mkdir()                     # this live process
    (tmp_path / "cw-agent-spec-xyz").mkdir()                               # not an episode's
    assert sweep_orphans() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"cw-agent-{os.getpid()}-def",
                                                          "cw-agent-spec-xyz"]
