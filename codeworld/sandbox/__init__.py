"""The project's one sandbox for untrusted code: bubblewrap + rlimits + a fork server.

* ``run_command(argv, workdir=..., limits=...)`` -> ``CommandResult``: one fresh sandbox.
* ``ForkServer(handler="pkg.mod:func", code_dirs={...}, limits=...)``: one long-lived
  sandboxed interpreter that forks a rlimited child per request; ``.call(req)`` ->
  ``SandboxResult`` (status ok / timeout / killed / error / too_large).
* ``map_requests(requests, handler, workers=..., batch_size=1)``: N fork servers, results
  in input order; ``batch_size`` > 1 runs consecutive requests in one fork
  (``ForkServer.call_batch``), re-running a failed batch request by request.

If no sandbox can be created, ``SandboxUnavailable`` is raised: nothing ever runs
unsandboxed. Design and measurements: ``bwrap.py`` and ``bench/sandbox_overhead.py``.
"""
from .bwrap import INSTALL_HINT, Bind, SandboxError, SandboxUnavailable, ensure_available
from .command import CommandResult, run_command
from .forkserver import ForkServer, SandboxResult, map_requests
from .limits import Limits

__all__ = ["Bind", "CommandResult", "ForkServer", "INSTALL_HINT", "Limits", "SandboxError",
           "SandboxResult", "SandboxUnavailable", "ensure_available", "map_requests",
           "run_command"]
