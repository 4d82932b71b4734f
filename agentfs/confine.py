"""What a tick may do, as the kernel enforces it: the Landlock masks, the seccomp filter and
the resource limits.

Nothing here decides *whether* a tick runs sandboxed (that is `sandbox.py`), and nothing
here applies a policy: this module builds each once, in the zygote, and `_spawn.c` applies
them in every child between vfork and exec.
"""

from __future__ import annotations

import errno
import resource
import socket
from dataclasses import dataclass

import landlockpy as landlock
import pyseccomp as seccomp

PROXY_PORT = 3128  # where the egress proxy listens inside the sandbox's network namespace

CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"

# Namespaces a tick may not make: a user namespace gives it capabilities over a new world
# (and the kernel's user-namespace code is a large attack surface); the others are
# refused anyway without capabilities, but say so at the filter.
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
CLONE_NEWNS, CLONE_NEWIPC = 0x00020000, 0x08000000
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                   0x40000000, 0x00000080)


@dataclass(frozen=True)
class Limits:
    """A tick's resource limits (rlimits): the per-uid process count makes NPROC exact."""

    memory: int  # RLIMIT_AS, bytes
    processes: int  # RLIMIT_NPROC: processes of the agent's uid at once
    files: int  # RLIMIT_NOFILE
    file_size: int  # RLIMIT_FSIZE, bytes

    def rlimits(self) -> list[tuple[int, int]]:
        """(resource, value) pairs, each set as both the soft and the hard limit."""
        return [(resource.RLIMIT_AS, self.memory), (resource.RLIMIT_NPROC, self.processes),
                (resource.RLIMIT_NOFILE, self.files), (resource.RLIMIT_FSIZE, self.file_size),
                (resource.RLIMIT_CORE, 0)]


def landlock_abi() -> int:
    return int(landlock.abi_version())


@dataclass(frozen=True)
class LandlockPolicy:
    """The access masks of a tick's Landlock ruleset, which `_spawn` builds in each child:
    read and execute everything the mount view shows; write only beneath the writable
    paths (the agentfs mount, /tmp, /dev, shared directories); TCP connect only to the
    proxy, bind nothing; abstract Unix sockets and signals only within the tick's own
    domain (each child restricts itself, so each tick is a domain of its own)."""

    fs_all: int  # every filesystem right this kernel handles: granted beneath writable paths
    fs_read: int  # granted everywhere
    net_handled: int
    net_connect: int  # granted for PROXY_PORT only
    scoped: int

    @classmethod
    def for_kernel(cls) -> LandlockPolicy:
        abi = landlock_abi()
        read = landlock.AccessFS.READ_FILE | landlock.AccessFS.READ_DIR | \
            landlock.AccessFS.EXECUTE
        scoped = landlock.Scope.ABSTRACT_UNIX_SOCKET | landlock.Scope.SIGNAL
        return cls(int(landlock.fs_for_abi(abi)), int(read), int(landlock.net_for_abi(abi)),
                   int(landlock.AccessNet.CONNECT_TCP), int(scoped & landlock.scope_for_abi(abi)))

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.fs_all, self.fs_read, self.net_handled, self.net_connect, self.scoped)


def seccomp_filter() -> seccomp.SyscallFilter:
    """System calls no tick needs and an attacker wants: new namespaces, io_uring (whose
    operations seccomp cannot see), eBPF, perf, keyrings, userfaultfd; and sockets other
    than Unix and TCP, so that no UDP or raw packet leaves a tick even on loopback."""
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    eperm = seccomp.ERRNO(errno.EPERM)
    for name in ("io_uring_setup", "io_uring_enter", "io_uring_register",
                 "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
                 "kexec_load", "open_by_handle_at", "name_to_handle_at", "fanotify_init"):
        f.add_rule(eperm, name)
    # clone3 passes its flags in memory, which seccomp cannot read: ENOSYS makes libc fall
    # back to clone(2), whose flags it can.
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for flag in NAMESPACE_FLAGS:
        f.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    # The zygote loads this filter on itself and every tick inherits it, so its own calls
    # pass: a new or joined mount or IPC namespace for a tick.  A tick (no capabilities)
    # is refused those by the kernel, with the same EPERM.
    for flag in set(NAMESPACE_FLAGS) - {CLONE_NEWNS, CLONE_NEWIPC}:
        f.add_rule(eperm, "unshare", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        f.add_rule(eperm, "setns", seccomp.Arg(1, seccomp.MASKED_EQ, flag, flag))
    f.add_rule(eperm, "setns", seccomp.Arg(1, seccomp.EQ, 0))  # "any kind" of namespace
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


def last_cap() -> int:
    """The highest capability number this kernel knows: the bounding set is emptied up to it."""
    try:
        with open(CAP_LAST_CAP_FILE) as f:
            return int(f.read())
    except OSError:
        return 63
