"""What a quota-mode command (run_command(..., workdir_quota_bytes=N)) is told when its working
copy takes longer to send back than the host waits (quota.COPY_GRACE_SECONDS past its wall).

    .venv/bin/python bench/quota_grace.py [--files 200000] [--wall 30]

The command writes real.txt, then ``--files`` empty files (no quota bytes: only inodes), then
sleeps past its wall time; the launcher's tar of that many entries (about 130 us each in
tarfile) runs past the grace and the host kills the sandbox. Prints, as JSON, what the caller
got. Measured at 200,000 files, wall 30 s: 51 s, timed_out, real.txt lost, and workdir_error
None before the fix (now: the sandbox was killed 20 s past the command's wall time...).
With --wall 10 the launcher's own RLIMIT_CPU (cpu_seconds = wall) ends the tar first.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codeworld.sandbox import Limits, run_command  # noqa: E402
from codeworld.sandbox.quota import COPY_GRACE_SECONDS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=200000)
    ap.add_argument("--wall", type=float, default=30.0)
    args = ap.parse_args()
    code = ("open('real.txt', 'w').write('the work')\n"
            f"for i in range({args.files}): open(f'e{{i}}', 'w').close()\n"
            "print('made', flush=True)\n"
            "import time; time.sleep(1e6)\n")
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp) / "wd"
        wd.mkdir()
        t = time.monotonic()
        r = run_command(["python3", "-c", code], workdir=wd, writable_workdir=True,
                        workdir_quota_bytes=256 << 20,
                        limits=Limits(wall_seconds=args.wall, cpu_seconds=args.wall))
        print(json.dumps({
            "empty_files": args.files, "wall_s": args.wall, "grace_s": COPY_GRACE_SECONDS,
            "host_seconds": round(time.monotonic() - t, 1), "stdout": r.stdout,
            "timed_out": r.timed_out, "returncode": r.returncode,
            "workdir_error": r.workdir_error, "real_txt_kept": (wd / "real.txt").exists()},
            indent=1))


if __name__ == "__main__":
    main()
