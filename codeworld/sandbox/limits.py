"""Resource limits of one sandboxed program (a fork-server request or a one-shot command).

The rlimits are applied inside the sandbox, in the process that runs the program, right
after fork (fork server) or right before exec (``run_command``); see ``server.apply_rlimits``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MiB = 1 << 20
SANDBOX_HEADROOM = 512 * MiB


@dataclass(frozen=True)
class Limits:
    """Per-program limits. All sizes are bytes.

    wall_seconds     wall-clock budget; the program and all its descendants are SIGKILLed
    cpu_seconds      RLIMIT_CPU (SIGXCPU at the limit, SIGKILL one second later)
    memory_bytes     RLIMIT_AS (address space: Python raises MemoryError or dies by signal)
    file_size_bytes  RLIMIT_FSIZE (largest file it may write; SIGXFSZ beyond)
    open_files       RLIMIT_NOFILE
    max_processes    RLIMIT_NPROC for the program: tasks (processes AND threads) it may
                     have alive at once, itself included. Counted per sandbox (the bwrap
                     user namespace), enforced because the sandbox uid is not 0.
    output_bytes     cap on the captured stdout and on stderr (each); the rest is read
                     and discarded, so unbounded output costs neither memory nor disk
    response_bytes   cap on a fork-server handler's JSON response (status too_large)
    tmpfs_bytes      size of the private /tmp (and of /dev/shm)
    sandbox_memory_bytes  cap on all the memory of the whole sandbox (every process, the
                     tmpfs pages, kernel objects such as their inodes), by a memory cgroup
                     (``memcg``) where one can be made; None: memory_bytes + both tmpfs +
                     SANDBOX_HEADROOM (the launcher or server, bwrap, the kernel's share)
    """

    wall_seconds: float = 10.0
    cpu_seconds: float = 10.0
    memory_bytes: int = 2048 * MiB
    file_size_bytes: int = 64 * MiB
    open_files: int = 256
    max_processes: int = 64
    output_bytes: int = 1 * MiB
    response_bytes: int = 16 * MiB
    tmpfs_bytes: int = 256 * MiB
    sandbox_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "sandbox_memory_bytes":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive number, got {value!r}")

    def sandbox_memory(self) -> int:
        """The whole sandbox's memory cap in bytes."""
        if self.sandbox_memory_bytes is not None:
            return int(self.sandbox_memory_bytes)
        return int(self.memory_bytes + 2 * self.tmpfs_bytes + SANDBOX_HEADROOM)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Limits":
        return dataclasses.replace(self, **changes)


DEFAULT_LIMITS = Limits()
