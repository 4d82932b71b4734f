"""The mount daemon: open and lock the store, mount, serve until unmounted or signalled."""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyfuse3
import trio

from . import errors, sandbox, status, units
from .fs import AgentFs
from .notify import ServiceNotifier
from .runtime import Runtime
from .store import DEFAULT_MAP_SIZE, MIN_MAP_SIZE, AgentStore

log = logging.getLogger("agentfs")
PR_SET_CHILD_SUBREAPER = 36

# Options mount(8) and fstab pass that mean nothing to a FUSE file system.
IGNORED_OPTIONS = {"defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail"}
PASSED_OPTIONS = {"allow_other", "default_permissions", "ro", "rw", "nosuid", "suid", "nodev",
                  "dev", "noexec", "exec", "noatime", "atime", "relatime", "sync", "async",
                  "dirsync"}


class MountError(Exception):
    pass


OUR_OPTIONS = {"jobs", "sandbox", "uid_base", "tools", "shared", "proxy_ca", "durability",
               "map_size"}
DURABILITY = ("disk", "daemon")  # what an acknowledged write survives: agentfs(1)


def fuse_options(store: Path, given: list[str]) -> tuple[set[str], dict[str, str]]:
    """The FUSE mount options for `-o` words, and agentfs's own (jobs, sandbox, uid_base,
    tools)."""
    options = set(pyfuse3.default_options)
    options.add(f"fsname={store}")
    options.add("subtype=agentfs")
    ours: dict[str, str] = {}
    for word in given:
        key, _, value = word.partition("=")
        if key in IGNORED_OPTIONS or key.startswith("x-") or key == "comment":
            continue
        if key in PASSED_OPTIONS:
            options.add(word)
        elif key in OUR_OPTIONS:
            ours[key] = value
        else:
            raise MountError(f"unknown mount option {word!r}")
    if ours.get("durability", "disk") not in DURABILITY:
        raise MountError(f"durability={ours['durability']}: say durability=disk (every "
                         "acknowledged write is on the disk) or durability=daemon (it "
                         "survives the daemon's death; a power cut may lose 0.1 s)")
    if ours.get("sandbox", "on") not in ("on", "off"):
        raise MountError(f"sandbox={ours['sandbox']}: say sandbox=on or sandbox=off")
    if "uid_base" in ours and not (ours["uid_base"].isdigit() and
                                   1000 <= int(ours["uid_base"]) < 2**32 - sandbox.UID_SPAN):
        raise MountError(f"uid_base={ours['uid_base']}: a uid from 1000 to "
                         f"{2**32 - sandbox.UID_SPAN - 1}")
    if "map_size" in ours:
        try:
            size = units.parse_size(ours["map_size"])
        except errors.FsError as e:
            raise MountError(f"map_size={ours['map_size']}: {e}") from None
        if size < MIN_MAP_SIZE:
            raise MountError(f"map_size={ours['map_size']}: at least {MIN_MAP_SIZE} bytes")
    for key in ("tools", "shared"):
        for path in _paths(ours, key):
            if not os.path.isabs(path) or not os.path.exists(path):
                raise MountError(f"{key}: {path!r} is not an absolute path that exists")
    if ours.get("sandbox", "on") == "on":
        # Other uids (the agents') must reach the mount at all, and the kernel must check
        # the modes and owners the tree declares.
        options |= {"allow_other", "default_permissions"}
    return options, ours


def _paths(ours: dict[str, str], key: str) -> list[str]:
    """A colon-separated list of paths given as `-o key=A:B`."""
    return [p for p in ours.get(key, "").split(":") if p]


def serve(store_path: Path, mountpoint: Path, options: list[str], jobs: int,
          ready_fd: int | None = None) -> int:
    """Mount in this process and serve until unmounted; returns an exit status."""
    faulthandler.enable()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agentfs[%(process)d] %(message)s")
    # First, before any program is started, so that none inherits the socket.
    notifier = ServiceNotifier()
    # Absolute paths, then cwd "/": the daemon holds no directory busy, and the programs
    # it starts begin there.
    store_path, mountpoint = store_path.resolve(), mountpoint.resolve()
    os.chdir("/")
    become_subreaper()
    try:
        fuse_opts, ours = fuse_options(store_path, options)
        if "jobs" in ours:
            jobs = int(ours["jobs"])
        map_size = units.parse_size(ours["map_size"]) if "map_size" in ours else DEFAULT_MAP_SIZE
        store = AgentStore.open(store_path, map_size,
                                sync=ours.get("durability", "disk") == "disk")
        store.lock()
    except Exception as e:  # noqa: BLE001 - every failure to start is reported the same way
        _report(ready_fd, f"agentfs: {e}", notifier)
        return 1
    box = None
    if ours.get("sandbox", "on") == "on":
        box = sandbox.Sandbox(str(mountpoint),
                              int(ours.get("uid_base", sandbox.DEFAULT_UID_BASE)),
                              _paths(ours, "tools"), _paths(ours, "shared"))
    if box is None:
        log.warning("sandbox=off: ticks run unconfined, as this daemon's user")
    runtime = Runtime(store, str(mountpoint), jobs, box, proxy_ca=ours.get("proxy_ca"))
    ops = AgentFs(runtime)
    try:
        pyfuse3.init(ops, str(mountpoint), fuse_opts)
    except RuntimeError as e:
        store.close()
        _report(ready_fd, f"agentfs: cannot mount on {mountpoint}: {e}", notifier)
        return 1
    log.info("mounted %s on %s", store_path, mountpoint)
    _report(ready_fd, None)
    unmount = True
    try:
        trio.run(_main, runtime, notifier)
    except BaseException:
        unmount = False
        raise
    finally:
        notifier.stopping("unmounting")
        pyfuse3.close(unmount=unmount)
        store.close()
        log.info("unmounted %s", mountpoint)
        notifier.close()
    return 0


async def _main(runtime: Runtime, notifier: ServiceNotifier) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.run)
        nursery.start_soon(_terminate_on_signals, runtime, notifier)
        nursery.start_soon(_watch_unmount, runtime, notifier)
        if notifier.address is not None:
            nursery.start_soon(_tell_service_manager, runtime, notifier)
        await pyfuse3.main(min_tasks=4, max_tasks=512)
        nursery.cancel_scope.cancel()


STATUS_EVERY = 5.0  # seconds between looks at the figures STATUS= shows


async def _tell_service_manager(runtime: Runtime, notifier: ServiceNotifier) -> None:
    """READY=1 once the tree answers, then the watchdog's pings and a STATUS= line whenever
    the figures change.  Ready means served: mounted is not enough, for the FUSE loop may
    not be reading requests yet, and what is ordered after us (the drivers) would hang."""
    mountpoint = runtime.engine.mountpoint
    try:
        # A listing is a request only this loop answers (stat may come from the kernel's cache).
        await trio.to_thread.run_sync(os.listdir, mountpoint, abandon_on_cancel=True)
    except OSError as e:
        log.error("%s does not answer (%s): not telling the service manager it is ready",
                  mountpoint, e.strerror or e)
        return
    shown = _status_line(runtime)
    notifier.ready(shown)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.keep_watchdog)
        while not notifier.stopping_sent:
            await trio.sleep(STATUS_EVERY)
            line = _status_line(runtime)
            if line != shown and not notifier.stopping_sent:
                notifier.status(line)
                shown = line


def _status_line(runtime: Runtime) -> str:
    """A few figures of the root `status` file (agentfs(4)), for `systemctl status`."""
    agents, awake = status.agent_counts(runtime)
    return (f"serving {runtime.engine.mountpoint}: agents {agents}, awake {awake}, "
            f"ticks running {runtime.engine.statistics().running}")


STOP_WAIT = 5.0  # seconds the FUSE loop goes on serving the killed ticks, at most


async def _stop(runtime: Runtime, notifier: ServiceNotifier) -> None:
    """End the mount: first every tick's processes (rolled back, as by a crash), then the
    FUSE loop, once the ticks have ended.  A killed process flushes the files of the mount
    it had open on its way out and waits for the answer, which only this loop gives; and
    once the loop is told to end, a request it has already read is dropped unanswered."""
    notifier.stopping(f"stopping: ending {len(runtime.engine.running)} running ticks")
    runtime.plumbing.close()
    runtime.engine.stop()
    with trio.move_on_after(STOP_WAIT):
        while runtime.engine.running:
            await trio.sleep(0.01)
    pyfuse3.terminate()


async def _terminate_on_signals(runtime: Runtime, notifier: ServiceNotifier) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            await _stop(runtime, notifier)
            return


UNMOUNT_POLL = 0.25  # seconds


async def _watch_unmount(runtime: Runtime, notifier: ServiceNotifier) -> None:
    """Notice `umount` or `fusermount3 -u` of our mount point.  The sandbox's mount view
    holds the FUSE connection open, so the kernel does not end it when the mount leaves
    this namespace: we must stop by ourselves."""
    while True:
        await trio.sleep(UNMOUNT_POLL)
        if not _mounted_here(runtime.engine.mountpoint):
            log.info("%s: no longer mounted here (umount): stopping", runtime.engine.mountpoint)
            await _stop(runtime, notifier)
            return


def _mounted_here(mountpoint: str) -> bool:
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if fields[4].decode(errors="replace") == mountpoint and b" - fuse" in line:
                return True
    return False


def become_subreaper() -> None:
    """Processes a tick leaves behind become ours, not init's, so they stay recognisable."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER): %s", os.strerror(ctypes.get_errno()))


def _report(ready_fd: int | None, error: str | None,
            notifier: ServiceNotifier | None = None) -> None:
    """Tell the parent that waits for us whether the mount is live (and the service
    manager why not)."""
    if error is not None:
        print(error, file=sys.stderr)
        if notifier is not None:
            notifier.status(error)
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"ok\n" if error is None else error.encode() + b"\n")
        except BrokenPipeError:  # whoever waited is gone: the mount serves all the same
            log.warning("the process that started this daemon did not wait for it")
        finally:
            os.close(ready_fd)


def spawn(store_path: Path, mountpoint: Path, options: list[str], jobs: int) -> int:
    """Start the daemon in the background; return once the mount is live or has failed."""
    read_end, write_end = os.pipe()
    args = [sys.executable, "-m", "agentfs", "mount", "-f", "--store", str(store_path),
            "--jobs", str(jobs), "--ready-fd", str(write_end)]
    if options:
        args += ["-o", ",".join(options)]
    args.append(str(mountpoint))
    log_fd = os.open(store_path / "daemon.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(log_fd, "ab") as logfile:
        # Not waited for: the daemon outlives this command, in a session of its own.
        subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                         pass_fds=(write_end,), start_new_session=True)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        answer = ready.read().decode().strip()
    if answer == "ok":
        return 0
    print(answer or "agentfs: the daemon exited before mounting (see daemon.log)",
          file=sys.stderr)
    return 1
