"""`.ci/run`, CI's entry point on a fresh machine, run against stand-ins for make and git (which
record their calls) on a PATH that has no git until `make sysdeps` installs it, as apt would."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MAKE = """#!{bash}
echo "make $*" >> {log}
if [ "$1" = sysdeps ]; then   # installs git, as Makefile's sysdeps does with apt-get
  # a git on which `config --global user.email` (3 args) finds no identity, and setting one works
  printf '#!{bash}\\necho "git $*" >> {log}\\n[ $# -gt 3 ]\\n' > {bin}/git
  {chmod} +x {bin}/git
fi
"""


def test_ci_installs_system_packages_before_it_uses_git(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.log"
    bash = shutil.which("bash")
    for tool in ("bash", "dirname"):   # all .ci/run needs besides make and git
        (bin_ / tool).symlink_to(shutil.which(tool))
    (bin_ / "make").write_text(MAKE.format(bash=bash, log=log, bin=bin_, chmod=shutil.which("chmod")))
    (bin_ / "make").chmod(0o755)
    env = {"PATH": str(bin_), "HOME": str(tmp_path)}
    res = subprocess.run([str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True,
                         timeout=60)
    # was exit 127 ("git: command not found") before make ran at all
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "make sysdeps" and calls[-1] == "make test", calls
    assert "git config --global user.email ci@codeworld.invalid" in calls
    assert "git config --global user.name codeworld-ci" in calls
