"""What a repository's test suite that floods its output costs the host (stages.repo_traces,
or with --stage agent the agent stage's test runs, stages.agent.envs.run_tests).

    .venv/bin/python bench/junk_output.py [--mib 64] [--line 'ff0a'] [--max-traces 1]
        [--stage repo_traces|agent]

A tiny repository whose one test writes ``--line`` (hex; default b"\\xff\\n") over and over,
``--mib`` MiB of it, to the runner's stdout pipe (the records' channel) and as much to stderr,
then calls the package once; trace_repository runs it with the default output cap (64 MiB at
max_traces=1). Prints, as JSON, the host's seconds and peak RSS (ru_maxrss of this process:
the sandbox's own processes are not counted) and the run's stats. The host kept the whole
capture of both streams, decoded it (each \\xff one U+FFFD) and built and JSON-parsed a str
per line: at 64 MiB of b"\\xff\\n" that was 205 s and 3.3 GiB (bad_lines 33554431).
The agent's run (its output cap: 16 MiB) prints the outcomes it read and whether the summary
came through; its records are written after the test, so after the junk.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.agent.envs import Env, run_tests  # noqa: E402
from stages.repo_traces import trace_repository  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--line", default="ff0a", help="the junk line, in hex")
    ap.add_argument("--max-traces", type=int, default=1)
    ap.add_argument("--stage", choices=("repo_traces", "agent"), default="repo_traces")
    args = ap.parse_args()
    line = bytes.fromhex(args.line)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "flood"
        (tree / "fpkg").mkdir(parents=True)
        (tree / "fpkg" / "__init__.py").write_text("def one():\n    return 1\n")
        (tree / "test_flood.py").write_text(textwrap.dedent(f"""\
            import os, stat, unittest
            import fpkg

            class T(unittest.TestCase):
                def test_flood(self):
                    err = os.fstat(2).st_ino
                    pipes = [fd for fd in range(3, 64) if _fifo(fd, err)]
                    chunk = {line!r} * ((1 << 20) // {len(line)})
                    for _ in range({args.mib}):
                        for fd in pipes:
                            os.write(fd, chunk)
                        os.write(2, chunk)
                    self.assertEqual(fpkg.one(), 1)

            def _fifo(fd, err):
                try:
                    st = os.fstat(fd)
                except OSError:
                    return False
                return stat.S_ISFIFO(st.st_mode) and st.st_ino != err
            """))
        for p in [Path(tmp), *Path(tmp).rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        t = time.perf_counter()
        if args.stage == "agent":
            env = Env("flood", tree, pkg_files=("fpkg/__init__.py",),
                      test_files=("test_flood.py",))
            run = run_tests(tree, env, wall_seconds=300)
            stats = {"outcomes": run.outcomes, "summary": bool(run.summary),
                     "timed_out": run.timed_out}
        else:
            records, stats = trace_repository(tree, max_traces=args.max_traces,
                                              wall_seconds=300)
            stats = {"traces": len(records),
                     **{k: stats[k] for k in ("completed", "timed_out", "returncode",
                                              "bad_lines", "malformed_traces", "seconds")}}
        seconds = time.perf_counter() - t
    print(json.dumps({
        "stage": args.stage, "mib_each_stream": args.mib, "line": args.line,
        "host_seconds": round(seconds, 1), "host_maxrss_mib_before": rss0,
        "host_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10, **stats},
        indent=1))


if __name__ == "__main__":
    main()
