import json
import subprocess
import sys

import pytest

from codeworld.config import load_params
from codeworld.shards import Dataset
from codeworld.tokens import END_OF_TEXT
from codeworld.trace_metrics import parse
from stages import corpus, dedup, traces
from stages.tracer.frames import unpack_frames
from tests.helpers import STDLIB, write_params

pytestmark = pytest.mark.skipif(__import__("shutil").which("bwrap") is None
                                and not __import__("os").environ.get("CI"), reason="needs bubblewrap")

MODULES = ("colorsys.py", "bisect.py", "heapq.py", "textwrap.py", "fnmatch.py")


def build(tmp_path, name: str, **traces_over):
    src = tmp_path / "src"
    if not src.exists():
        src.mkdir()
        for m in MODULES:
            (src / m).write_text((STDLIB / m).read_text())
    over = {"max_programs": 120, "programs_per_shard": 50, "workers": 2, "repositories": [], **traces_over}
    params = load_params(write_params(tmp_path / f"{name}.yaml", tmp_path / name,
                                      [{"kind": "dir", "path": str(src), "name": "lib"}], traces=over))
    corpus.run(params, track=False, metrics_path=None)
    dedup.run(params, track=False, metrics_path=None)
    return traces.run(params, track=False, metrics_path=str(tmp_path / f"{name}-traces.json"))


def test_stage_traces_corpus_functions_deterministically(tmp_path):
    m = build(tmp_path, "a")
    recs = list(Dataset.open(str(tmp_path / "a" / "traces")))
    assert m["records"] == len(recs) > 20
    stats = m["stats"]["metrics"]
    assert 50 < stats["programs"] <= 120 and stats["kept"] == len(recs)
    assert sum(v for k, v in stats.items() if k.startswith("status_")) == stats["programs"]
    for r in recs:
        assert r["status"] in ("ok", "exception")
        assert r["trace"].startswith("<|line_sep|>{}<|action_sep|>    return ")
        assert r["trace"].endswith("<|frame_sep|>")
        assert r["prompt"].startswith("<|trace_context_start|>") and "# << START_OF_TRACE" in r["prompt"]
        assert r["provenance"]["corpus_id"].startswith("lib/")
        assert r["provenance"]["generator"] in ("function", "doctest")
        assert r["provenance"]["input_source"]
    # the frames are kept packed, and unpack to the states the text says (main's call first)
    for r in recs:
        frames = unpack_frames(r["frames"])
        assert len(json.dumps(r["frames"])) < len(json.dumps(frames))
        said = parse(r["trace"] + END_OF_TEXT).frames
        assert [(f["kind"], f["locals"], f["value"]) for f in frames[1:]] == \
            [(f.kind, f.locals, f.value) for f in said]
    # no two kept traces share a behaviour
    sigs = [traces.behaviour(r, f"{r['provenance']['corpus_id']}:{r['provenance']['qualname']}") for r in recs]
    assert len(set(sigs)) == len(sigs)
    metrics = json.loads((tmp_path / "a-traces.json").read_text())
    assert metrics["traces_per_second"] > 0 and metrics["kept"] == len(recs)
    # what the generator passed over is a metric too, not only in the manifest
    assert {f"generated_{k.replace(':', '_')}": v for k, v in m["stats"]["programs"].items()}.items() \
        <= metrics.items()
    assert metrics["generated_functions"] > 0 and any(k.startswith("generated_skipped_") for k in metrics)
    # same params and seed, other workers: byte-identical data
    build(tmp_path, "b", workers=1)
    for shard in sorted(p.name for p in (tmp_path / "a" / "traces").iterdir()):
        assert (tmp_path / "a/traces" / shard).read_bytes() == (tmp_path / "b/traces" / shard).read_bytes()


def test_trace_cli_keeps_order_and_survives_hostile_programs(tmp_path):
    rows = [
        {"id": "pop", "code": "def f(nums, i):\n    nums.pop(i)\n    return nums\n", "input": "[35, 45, 3], 0"},
        {"id": "loop", "code": "def f():\n    while True:\n        pass\n", "call": "f()"},
        "not an object",
        {"id": "secret", "code": "def g():\n    return open('/etc/shadow').read()\n", "call": "g()"},
        {"id": "env", "code": "import os\ndef g():\n    return os.environ.get('AWS_SECRET_ACCESS_KEY')\n", "call": "g()"},
        {"id": "bomb", "code": "def g():\n    x = []\n    while True:\n        x.append(' ' * 10**7)\n", "call": "g()"},
        {"id": "net", "code": "import socket\ndef g():\n    socket.create_connection(('127.0.0.1', 22), 1)\n", "call": "g()"},
        {"id": "noise", "code": "def g():\n    for _ in range(10**6):\n        print('x' * 1000)\n", "call": "g()"},
        {"id": "div", "code": "def f(x):\n    return 1 / x\n", "input": "0"},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    env = {**__import__("os").environ, "AWS_SECRET_ACCESS_KEY": "topsecret"}
    res = subprocess.run([sys.executable, "-m", "codeworld.cli", "trace", str(inp), str(tmp_path / "out.jsonl"),
                          "--timeout", "3"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == len(rows) + 1
    by = {o["id"]: o for o in out}
    assert [o["id"] for o in out][:2] == ["pop", "loop"]
    assert by["pop"]["status"] == "ok" and by["pop"]["result"] == "[45, 3]"
    assert by["pop"]["trace"].endswith('<|arg_sep|>"[45, 3]"<|frame_sep|>')
    assert set(out[0]) == {"id", "trace", "result", "error", "status"}
    assert by["loop"]["status"] in ("too_long", "timeout") and by["loop"]["trace"] is None
    assert out[2]["status"] == "invalid" and out[-1]["status"] == "invalid"
    # each says what is wrong with its line
    assert out[2]["error"] == "Invalid: not a JSON object (str)"
    assert out[-1]["error"].startswith("Invalid: not JSON: ")
    assert by["secret"]["status"] == "exception" and by["secret"]["error"].split(":")[0] in (
        "FileNotFoundError", "PermissionError")
    assert by["env"]["status"] == "ok" and by["env"]["result"] == "None"
    assert by["bomb"]["status"] in ("exception", "killed", "timeout", "too_long")
    assert by["net"]["status"] == "exception" and "OSError" in by["net"]["error"] or "Error" in by["net"]["error"]
    assert by["noise"]["status"] in ("ok", "too_long", "timeout", "killed")
    assert by["div"]["status"] == "exception" and by["div"]["error"] == "ZeroDivisionError: division by zero"


def test_stage_traces_a_local_repository_test_suite(tmp_path):
    tree = tmp_path / "repo"
    (tree / "calc").mkdir(parents=True)
    (tree / "tests").mkdir()
    (tree / "calc" / "__init__.py").write_text(
        "def add(a, b):\n    total = a + b\n    return total\n\n"
        "def ratio(a, b):\n    return a / b\n")
    (tree / "tests" / "__init__.py").write_text("")
    (tree / "tests" / "test_calc.py").write_text(
        "import unittest\nfrom calc import add, ratio\n\n"
        "class T(unittest.TestCase):\n"
        "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n\n"
        "    def test_ratio(self):\n        with self.assertRaises(ZeroDivisionError):\n            ratio(1, 0)\n")
    for p in [tmp_path, *tmp_path.rglob("*")]:  # readable by the sandbox's unprivileged uid
        p.chmod(0o755 if p.is_dir() else 0o644)
    m = build(tmp_path, "r", max_programs=10, repositories=[{"name": "calc", "path": str(tree)}])
    recs = [r for r in Dataset.open(str(tmp_path / "r" / "traces"))
            if r["provenance"].get("generator") == "repository"]
    funcs = {r["function"]: r for r in recs}
    assert set(funcs) == {"add", "ratio"}
    assert funcs["add"]["status"] == "ok" and funcs["add"]["result"] == "5"
    assert funcs["add"]["trace"].startswith('<|call_sep|>{"a": "2", "b": "3"}<|action_sep|>def add(a, b):')
    assert funcs["ratio"]["status"] == "exception" and "ZeroDivisionError" in funcs["ratio"]["error"]
    assert m["stats"]["metrics"]["generator_repository"] == 2
    # repo_max_traces 0: the suites do not run and no repository shard is made
    m0 = build(tmp_path, "r0", max_programs=10, repo_max_traces=0,
               repositories=[{"name": "calc", "path": str(tree)}])
    assert "generator_repository" not in m0["stats"]["metrics"]
    assert len(m0["shards"]) == len(m["shards"]) - 1


@pytest.mark.skipif(not (STDLIB / "distutils" / "__init__.py").exists(),
                    reason="no distutils in this Python's standard library (3.12+)")
def test_sandbox_imports_the_standard_librarys_distutils():
    # setuptools' .pth hook would swap in its own distutils, a second of imports per forked
    # child against the 0.5 s wall limit of then: traces that timed out or not with the load
    from codeworld.config import TraceLimitsConfig
    from stages.trace_runner import trace_requests

    code = "import distutils.version\n\ndef f(v):\n    return distutils.version.__file__, v\n"
    reqs = [{"id": i, "code": code, "call": f"f({i})"} for i in range(6)]
    first = trace_requests(reqs, TraceLimitsConfig(), workers=1, batch_size=4)
    assert [r["status"] for r in first] == ["ok"] * 6
    assert f"{STDLIB}/distutils/version.py" in first[0]["result"]
    assert "site-packages" not in first[0]["result"]
    # and the same requests batched otherwise give the same records (the stage's double run)
    again = trace_requests(reqs[::-1], TraceLimitsConfig(), workers=2, batch_size=1)[::-1]
    assert again == first


def test_a_value_showing_the_harness_is_dropped():
    """A captured call stack names the tracer's files inside the sandbox: a fact about our
    harness (it changes whenever the harness does), not about the code."""
    from types import SimpleNamespace

    cfg = load_params("params.yaml").traces
    prov = {"corpus_id": "lib/m.py", "input_source": "annotation"}
    cases = [SimpleNamespace(id="plain", code="def f(x):\n    return x + 1\n", call="f(1)",
                             provenance={**prov, "qualname": "f"}),
             SimpleNamespace(id="stack", call="g(3)", provenance={**prov, "qualname": "g"},
                             code="import traceback\n\n\ndef g(n):\n"
                                  "    return [f.filename for f in traceback.extract_stack(limit=n)]\n")]
    kept, meta = traces.trace_group(cases, cfg, set())
    assert [r["id"] for r in kept] == ["plain"]
    assert meta["counts"]["exposes_harness"] == 1 and meta["counts"]["status_ok"] == 2


def test_a_trace_whose_reprs_change_the_program_is_dropped_and_counted():
    """A __repr__ with a side effect: the tracer reprs the local at every frame, the program
    untraced never does. The traced run returned 9 where the program returns 0; the trace was
    kept (its second run agrees). Now its untraced reference run tells (tracer/untraced.py)."""
    from types import SimpleNamespace

    from tests.test_tracer import SIDE_EFFECT_REPRS

    cfg = load_params("params.yaml").traces
    prov = {"corpus_id": "lib/m.py", "input_source": "annotation"}
    code, call, _ = SIDE_EFFECT_REPRS["counter"]
    pure = code.replace("        self.n += 1\n", "")
    cases = [SimpleNamespace(id="changed", code=code, call=call, provenance={**prov, "qualname": "f"}),
             SimpleNamespace(id="pure", code=pure, call=call, provenance={**prov, "qualname": "f"})]
    kept, meta = traces.trace_group(cases, cfg, set())
    assert [(r["id"], r["result"]) for r in kept] == [("pure", "0")]
    assert meta["counts"]["repr_side_effect"] == 1 and meta["counts"]["status_invalid"] == 1
    assert meta["failures"] == {"repr_side_effect": 1}


def test_frames_of_a_trace_within_the_text_limits_come_back_whole():
    # every local repeated at every frame used to pass the response cap (6 MB of frames for
    # 0.9 MB of text): such a trace came back too_long with frames, ok without
    from codeworld.config import TraceLimitsConfig
    from stages.trace_runner import trace_requests
    from stages.tracer import trace_call
    from tests.test_tracer import BIG_FRAMES

    req = {"id": 1, "code": BIG_FRAMES["code"], "call": BIG_FRAMES["call"]}
    plain, framed = (trace_requests([req], TraceLimitsConfig(), workers=1, batch_size=1,
                                    frames=frames)[0] for frames in (False, True))
    assert framed["status"] == plain["status"] == "ok" and framed["trace"] == plain["trace"]
    want = trace_call(req["code"], req["call"])
    assert framed["trace"] == want.text
    assert framed["frames"] == [{"kind": f.kind, "scope": f.scope, "line": f.line,
                                 "locals": f.locals, "value": f.value} for f in want.frames]
