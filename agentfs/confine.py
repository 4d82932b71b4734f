"""What a tick may do, as the kernel enforces it: the Landlock ruleset, the seccomp filter,
the resource limits and the credential drop, applied in the sandbox's forked child.

Nothing here decides *whether* a tick runs sandboxed (that is `sandbox.py`); this module
only builds the policies once, in the zygote, and applies them in each child before exec.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import socket
from dataclasses import dataclass

import landlockpy as landlock
import pyseccomp as seccomp

PROXY_PORT = 3128  # where the egress proxy listens inside the sandbox's network namespace

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"

# Namespaces a tick may not make: a user namespace gives it capabilities over a new world
# (and the kernel's user-namespace code is a large attack surface); the others are
# refused anyway without capabilities, but say so at the filter.
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                   0x40000000, 0x00000080)


@dataclass(frozen=True)
class Limits:
    """A tick's resource limits (rlimits): the per-uid process count makes NPROC exact."""

    memory: int  # RLIMIT_AS, bytes
    processes: int  # RLIMIT_NPROC: processes of the agent's uid at once
    files: int  # RLIMIT_NOFILE
    file_size: int  # RLIMIT_FSIZE, bytes

    def apply(self) -> None:
        for which, value in ((resource.RLIMIT_AS, self.memory),
                             (resource.RLIMIT_NPROC, self.processes),
                             (resource.RLIMIT_NOFILE, self.files),
                             (resource.RLIMIT_FSIZE, self.file_size),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))


def landlock_abi() -> int:
    return int(landlock.abi_version())


def landlock_ruleset(writable: list[str]) -> landlock.Ruleset:
    """Read and execute everything the mount view shows; write only beneath `writable`
    (the agentfs mount, /tmp, /dev); TCP only to the proxy, bind nothing; abstract Unix
    sockets and signals only within the tick's own domain (each child restricts itself,
    so each tick is a domain of its own)."""
    abi = landlock.abi_version()
    everything = landlock.fs_for_abi(abi)
    ruleset = landlock.Ruleset(
        handled_fs=everything,
        scoped=landlock.Scope.ABSTRACT_UNIX_SOCKET | landlock.Scope.SIGNAL)
    read = (landlock.AccessFS.READ_FILE | landlock.AccessFS.READ_DIR |
            landlock.AccessFS.EXECUTE)
    ruleset.allow_path("/", read)
    for path in writable:
        ruleset.allow_path(path, everything)
    ruleset.allow_port(PROXY_PORT, landlock.AccessNet.CONNECT_TCP)
    return ruleset


def seccomp_filter() -> seccomp.SyscallFilter:
    """System calls no tick needs and an attacker wants: new namespaces, io_uring (whose
    operations seccomp cannot see), eBPF, perf, keyrings, userfaultfd; and sockets other
    than Unix and TCP, so that no UDP or raw packet leaves a tick even on loopback."""
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    eperm = seccomp.ERRNO(errno.EPERM)
    for name in ("unshare", "setns", "io_uring_setup", "io_uring_enter", "io_uring_register",
                 "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
                 "kexec_load", "open_by_handle_at", "name_to_handle_at", "fanotify_init"):
        f.add_rule(eperm, name)
    # clone3 passes its flags in memory, which seccomp cannot read: ENOSYS makes libc fall
    # back to clone(2), whose flags it can.
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for flag in NAMESPACE_FLAGS:
        f.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    # Unix (1), IPv4 (2) and IPv6 (10) only: no netlink, packet, vsock, XDP...
    nosupport = seccomp.ERRNO(errno.EAFNOSUPPORT)
    f.add_rule(nosupport, "socket", seccomp.Arg(0, seccomp.GT, socket.AF_INET6))
    for family in range(3, socket.AF_INET6):
        f.add_rule(nosupport, "socket", seccomp.Arg(0, seccomp.EQ, family))
    for family in (socket.AF_INET, socket.AF_INET6):
        for kind in (socket.SOCK_DGRAM, socket.SOCK_RAW, socket.SOCK_SEQPACKET):
            f.add_rule(eperm, "socket", seccomp.Arg(0, seccomp.EQ, family),
                       seccomp.Arg(1, seccomp.MASKED_EQ, 0xF, kind))
    return f


PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def compiled(f: seccomp.SyscallFilter) -> bytes:
    """The filter as BPF, compiled once (libseccomp compiles anew at every load)."""
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(write_end, "wb") as out:
            f.export_bpf(out)
        with os.fdopen(read_end, "rb") as source:
            read_end = -1
            return source.read()
    finally:
        if read_end >= 0:
            os.close(read_end)


def load_compiled(program: bytes) -> None:
    """Install a filter from `compiled` (8 bytes an instruction) in this thread."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"seccomp: {os.strerror(code)}")


def drop_bounding_set() -> None:
    """Empty the capability bounding set: nothing the tick execs can gain one."""
    try:
        with open(CAP_LAST_CAP_FILE) as f:
            last = int(f.read())
    except OSError:
        last = 40
    for cap in range(last + 1):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)


def set_parent_death_signal(signum: int) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def become(uid: int, gid: int) -> None:
    """The agent's own uid and gid, no supplementary groups; capabilities go with root."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
