"""The sandbox's two errors, and the install hint they carry."""
from __future__ import annotations

INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `apt-get install -y bubblewrap`) and allow "
                "user namespaces (sysctl user.max_user_namespaces > 0; on Ubuntu also "
                "kernel.apparmor_restrict_unprivileged_userns=0)")


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be created here. Never fall back to running unsandboxed."""


class SandboxError(RuntimeError):
    """The sandbox was created but misbehaved, or was misconfigured."""
