"""The sandbox's seccomp filter: the few system calls that reach memory or state which neither
the sandbox's memory cgroup (``memcg``) nor a fork-server request's own namespaces hold.

- ``socket``/``socketpair`` make AF_UNIX, AF_INET and AF_INET6 sockets only (EAFNOSUPPORT
  otherwise): a netlink socket's queued datagrams are kernel memory charged to no cgroup
  (an attacker-minded audit pinned 1.7 GiB of host memory from a sandbox capped at 160 MiB).
- ``io_uring_*``: ENOSYS (its IORING_OP_SOCKET makes a socket without ``socket()``).
- ``add_key``/``request_key``/``keyctl``: ENOSYS (a key in the user's keyring outlives a
  request: state, even data, passed from one fork-server request to the next).
- Any other ABI (x32 on x86-64; a 32-bit binary, whose ``socketcall`` multiplexes every socket
  call behind a pointer no filter can read): ENOSYS.

The host builds the classic-BPF program here (``program``); the sandbox side installs it
(``server._install_seccomp``: PR_SET_NO_NEW_PRIVS, then SECCOMP_MODE_FILTER) in the fork
server before its first request and in the launcher before the command, so every program and
all it starts run under it. A machine whose architecture has no table here gets no filter.
"""
from __future__ import annotations

import errno
import functools
import logging
import platform
import socket
import struct

# classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h)
_LD_W_ABS, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
_DATA_NR, _DATA_ARCH, _DATA_ARG0 = 0, 4, 16  # offsets in struct seccomp_data (args: low half, LE)
_X32_BIT = 0x40000000
FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)

# AUDIT_ARCH_* and the numbers of the calls concerned, per machine
_TABLES = {
    "x86_64": (0xC000003E, True, {"socket": 41, "socketpair": 53, "add_key": 248,
                                   "request_key": 249, "keyctl": 250, "io_uring_setup": 425,
                                   "io_uring_enter": 426, "io_uring_register": 427}),
    "aarch64": (0xC00000B7, False, {"socket": 198, "socketpair": 199, "add_key": 217,
                                     "request_key": 218, "keyctl": 219, "io_uring_setup": 425,
                                     "io_uring_enter": 426, "io_uring_register": 427}),
}
BLOCKED = ("add_key", "request_key", "keyctl", "io_uring_setup", "io_uring_enter",
           "io_uring_register")


def program(machine: str | None = None) -> bytes | None:
    """The filter as bytes of ``struct sock_filter`` (8 bytes each), or None where this
    machine's architecture has no table."""
    table = _TABLES.get(machine or platform.machine())
    if table is None:
        return None
    arch, has_x32, nr = table
    ins: list = []  # (code, jump-if-true label or 0, jump-if-false label or 0, k)
    ins.append((_LD_W_ABS, 0, 0, _DATA_ARCH))
    ins.append((_JEQ, 0, "nosys", arch))
    ins.append((_LD_W_ABS, 0, 0, _DATA_NR))
    if has_x32:
        ins.append((_JGE, "nosys", 0, _X32_BIT))
    for name in BLOCKED:
        ins.append((_JEQ, "nosys", 0, nr[name]))
    ins.append((_JEQ, "family", 0, nr["socket"]))
    ins.append((_JEQ, "family", 0, nr["socketpair"]))
    ins.append((_RET, 0, 0, RET_ALLOW))
    labels = {"family": len(ins)}
    ins.append((_LD_W_ABS, 0, 0, _DATA_ARG0))
    for family in FAMILIES:
        ins.append((_JEQ, "allow", 0, int(family)))
    ins.append((_RET, 0, 0, RET_ERRNO | errno.EAFNOSUPPORT))
    labels["allow"] = len(ins)
    ins.append((_RET, 0, 0, RET_ALLOW))
    labels["nosys"] = len(ins)
    ins.append((_RET, 0, 0, RET_ERRNO | errno.ENOSYS))

    def offset(at: int, target) -> int:
        if target == 0:
            return 0
        jump = labels[target] - at - 1  # relative to the next instruction
        assert 0 <= jump < 256, (target, jump)
        return jump

    return b"".join(struct.pack("<HBBI", code, offset(i, jt), offset(i, jf), k)
                    for i, (code, jt, jf, k) in enumerate(ins))


@functools.lru_cache(maxsize=None)
def program_hex() -> str:
    """``program()`` as the hex string the sandbox's config carries ("" for none)."""
    code = program()
    if code is None:
        logging.getLogger(__name__).warning(
            "no seccomp table for %s: sandboxes run without the filter (netlink sockets, "
            "io_uring and keyrings stay open to programs)", platform.machine())
    return (code or b"").hex()
