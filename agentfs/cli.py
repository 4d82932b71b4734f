"""The `agentfs` command: init, id, mount (and the mount(8) helper form), ps and top;
export and import are archive_cli's, nostr is nostr.cli's."""

from __future__ import annotations

import argparse
import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import lmdb

from . import archive_cli, audit, fleet, identity
from .archive import ArchiveError
from .nostr import cli as nostr_cli
from .nostr import event as nostr_event
from .store import AgentStore, agent_key, default_store_path, scan_prefix

DEFAULT_JOBS = max(4, 4 * (os.cpu_count() or 1))
# What a FUSE mount whose daemon died answers: ECONNABORTED to a request in flight as it
# went, ENOTCONN to every one after.
DEAD_MOUNT_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


def _read_mnemonic(source: str) -> str:
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    return identity.normalize_mnemonic(text)


def cmd_init(args: argparse.Namespace) -> int:
    store = Path(args.store) if args.store else default_store_path()
    if (store / "data.mdb").exists():
        print(f"agentfs: {store}: a store already exists", file=sys.stderr)
        return 1
    recovered = args.mnemonic_file is not None
    words = _read_mnemonic(args.mnemonic_file) if recovered else identity.generate_mnemonic()
    AgentStore.create(store, words).close()
    if recovered:
        print(f"agentfs: created {store} from the given mnemonic", file=sys.stderr)
    else:
        print(f"agentfs: created {store}. Write down this mnemonic now: it is shown once, "
              "and it alone recovers every agent's key.", file=sys.stderr)
        print(words)
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    words = _read_mnemonic(args.mnemonic_file)
    if args.user:
        private = identity.user_private_key(words)
    else:
        private = identity.agent_private_key(words, args.agent)
    public = identity.public_key(private)
    print(identity.npub_encode(public), public.hex())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.log is not None:
        return _verify_files(args)
    if args.agent is None:
        print("agentfs: verify needs an agent's name or npub, or --log and --head",
              file=sys.stderr)
        return 2
    try:
        store = AgentStore.open_readonly(Path(args.store) if args.store else
                                         default_store_path())
    except (OSError, ValueError, lmdb.Error) as e:
        print(f"agentfs: {e}", file=sys.stderr)
        return 2
    try:
        with store.read() as txn:
            index = None
            if args.agent.startswith("npub1"):
                index = store.index_by_pubkey(txn, identity.npub_decode(args.agent))
            else:
                index = store.index_by_name(txn, args.agent)
            record = None if index is None else store.agent(txn, index)
            if record is None:
                print(f"agentfs: no agent {args.agent!r} in {store.path}", file=sys.stderr)
                return 2
            lines = [line for _offset, line in
                     scan_prefix(txn, store.db["log"], agent_key(record.index))]
            raw = txn.get(agent_key(record.index), db=store.db["heads"])
    finally:
        store.close()
    head = None if raw is None else nostr_event.from_json(bytes(raw))  # the daemon's own
    verdict = audit.check_log(lines, record.pubkey, head)
    who = f"{record.npub} ({record.name})" if record.name else record.npub
    print(f"{who}: {_verdict_text(verdict)}")
    return 0 if verdict.ok else 1


def _verify_files(args: argparse.Namespace) -> int:
    """A copy of a log and its head, checked with nothing else: what a third party does."""
    if args.head is None:
        print("agentfs: verify --log needs --head", file=sys.stderr)
        return 2
    try:
        text = Path(args.head).read_text().strip()
        head = nostr_event.from_json(text) if text else None
    except OSError as e:
        print(f"agentfs: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"{args.head}: not a Nostr event: {e}")
        return 1
    if args.npub is not None:
        pubkey = identity.npub_decode(args.npub).hex()
    elif head is not None:
        pubkey = head.pubkey
    else:
        print("agentfs: the head file is empty: give --npub", file=sys.stderr)
        return 2
    try:
        with open(args.log, "rb") as f:
            verdict = audit.check_log(f, pubkey, head, tail_allowed=True)
    except OSError as e:
        print(f"agentfs: {e}", file=sys.stderr)
        return 2
    print(f"{identity.npub_encode(bytes.fromhex(pubkey))}: {_verdict_text(verdict)}")
    return 0 if verdict.ok else 1


def _verdict_text(verdict: audit.Verdict) -> str:
    if verdict.problem is not None:
        return verdict.problem
    if verdict.records == 0:
        return "the log is empty"
    if verdict.unchained == verdict.records:
        return (f"{verdict.records} records, all from before the chain (a store from before "
                "it): nothing to check")
    parts = [f"{verdict.records} records check"]
    if verdict.head_time is not None:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(verdict.head_time))
        parts.append(f"the head signed at {when} covers records 1-{verdict.signed}")
        if verdict.signed < verdict.records:
            parts.append(f"records {verdict.signed + 1}-{verdict.records} came after it "
                         "and are chained to it, not yet signed")
    if verdict.unchained:
        parts.append(f"records 1-{verdict.unchained} predate the chain (a store from "
                     "before it) and are not chained")
    return "; ".join(parts)


def _unescape(field: str) -> str:
    """A field of /proc/self/mountinfo, which writes space, tab, newline and \\ in octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mounts_at(path: str) -> list[tuple[str, str]]:
    """(type, source) of each mount on `path`, in mountinfo's order: the visible one last."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            if _unescape(fields.split()[4]) == path:
                fstype, source = [*rest.split(), "", ""][:2]
                found.append((fstype, _unescape(source)))
    return found


def _listing_errno(path: Path) -> int | None:
    """The errno that reading `path` as a directory fails with, or None.

    A listing asks a FUSE mount's daemon itself, where stat may be answered from the
    kernel's cache: only the listing tells a dead mount from a live one."""
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as e:
        return e.errno
    return None


def clear_dead_mounts(mountpoint: Path) -> str | None:
    """Make `mountpoint` ready to mount on: unmount the FUSE mounts whose daemons died there
    (kill -9 leaves one), saying so.  Returns why not, if it is a live mount of anything."""
    path = os.path.realpath(mountpoint)
    # Each unmount uncovers the mount below: earlier versions stacked live mounts on dead ones.
    for _ in range(8):
        mounts = mounts_at(path)
        if not mounts:
            return None
        fstype, source = mounts[-1]
        if _listing_errno(mountpoint) not in DEAD_MOUNT_ERRNOS:
            return f"{mountpoint}: already a mount point ({fstype} of {source}); unmount it first"
        if fstype not in ("fuse", "fuseblk") and not fstype.startswith("fuse."):
            return f"{mountpoint}: a {fstype} mount there is not connected; unmount it first"
        done = subprocess.run(["fusermount3", "-uz", path], capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            return (f"{mountpoint}: a dead mount of {source} is there and fusermount3 -uz "
                    f"failed: {done.stderr.strip() or f'exit status {done.returncode}'}")
        print(f"agentfs: {mountpoint}: cleared a dead mount of {source} (its daemon was gone) "
              "with fusermount3 -uz", file=sys.stderr)
    return f"{mountpoint}: dead mounts are still there after clearing 8 of them"


def cmd_mount(args: argparse.Namespace) -> int:
    from . import daemon, egress

    store = Path(args.store) if args.store else default_store_path()
    mountpoint = Path(args.mountpoint)
    options = [o for chunk in args.o for o in chunk.split(",") if o]
    if not (store / "data.mdb").exists():
        print(f"agentfs: {store}: no store here (create one with `agentfs init {store}`)",
              file=sys.stderr)
        return 1
    # The daemon `spawn` starts (it passes --ready-fd) finds the mount point checked already.
    if args.ready_fd is None and (problem := clear_dead_mounts(mountpoint)):
        print(f"agentfs: {problem}", file=sys.stderr)
        return 1
    if not mountpoint.is_dir():
        print(f"agentfs: {mountpoint}: not a directory", file=sys.stderr)
        return 1
    try:
        _fuse, ours = daemon.fuse_options(store, options)
    except daemon.MountError as e:
        print(f"agentfs: {e}", file=sys.stderr)
        return 1
    if "proxy_ca" in ours:
        egress.check_ca(ours["proxy_ca"])  # here, where the error can be told
    if args.foreground:
        return daemon.serve(store, mountpoint, options, args.jobs, args.ready_fd)
    return daemon.spawn(store, mountpoint, options, args.jobs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agentfs",
        description="A Plan 9-style file server for autonomous agents. See agentfs(1) and "
                    "agentfs(4).",
        epilog="mount(8) helper form: agentfs STORE MOUNTPOINT [-o OPTIONS], as run by "
               "`mount -t fuse.agentfs STORE MOUNTPOINT`.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="create a store and its mnemonic",
                          description="Create a store (an LMDB directory) with a new BIP-39 "
                                      "mnemonic, printed once, or one given for recovery.")
    init.add_argument("store", nargs="?", help="store directory (default: $AGENTFS_STORE, "
                      "$XDG_DATA_HOME/agentfs or ~/.local/share/agentfs)")
    init.add_argument("--mnemonic-file", metavar="F",
                      help="recover from the mnemonic in F ('-' reads standard input)")
    init.set_defaults(run=cmd_init)

    ident = sub.add_parser("id", help="print a NIP-06 identity of a mnemonic",
                           description="Print `npub1… HEX` for the user's key "
                                       "(m/44'/1237'/0'/0/0) or agent N's "
                                       "(m/44'/1237'/(N+1)'/0/0).")
    ident.add_argument("--mnemonic-file", metavar="F", required=True,
                       help="file holding the mnemonic ('-' reads standard input)")
    which = ident.add_mutually_exclusive_group(required=True)
    which.add_argument("--user", action="store_true", help="the user's own key")
    which.add_argument("--agent", type=int, metavar="N", help="agent N (0 is the first)")
    ident.set_defaults(run=cmd_id)

    mount = sub.add_parser("mount", help="mount a store",
                           description="Mount a store's agents as files. Returns once the mount "
                                       "is live; the daemon serves until unmounted "
                                       "(fusermount3 -u, umount, or SIGTERM).")
    mount.add_argument("mountpoint")
    mount.add_argument("--store", help="store directory (default as for init)")
    mount.add_argument("-f", "--foreground", action="store_true",
                       help="serve in the foreground instead of as a daemon")
    mount.add_argument("-o", action="append", default=[], metavar="OPTIONS",
                       help="comma-separated mount options (allow_other, ro, jobs=N, ...)")
    mount.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                       help=f"ticks that may run at once (default {DEFAULT_JOBS})")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.set_defaults(run=cmd_mount)

    verify = sub.add_parser(
        "verify", help="check an agent's log: its hash chain and signed head",
        description="Check an agent's log in a store (a daemon may be serving it): each "
                    "record's prev is the hash of the one before, and the last is the one "
                    "the agent's signed head names. Or check a copy of a log against a copy "
                    "of its head (--log, --head), as anyone can. Prints the verdict, naming "
                    "the first record that does not check; exit status 0 if all check, 1 "
                    "if not. See agentfs(4), log.")
    verify.add_argument("agent", nargs="?", help="the agent's name or npub")
    verify.add_argument("--store", help="store directory (default as for init)")
    verify.add_argument("--log", metavar="FILE", help="a copy of an agent's log")
    verify.add_argument("--head", metavar="FILE",
                        help="the signed head to check it against (the agent's head file)")
    verify.add_argument("--npub", help="with --log: the agent the head must be signed by "
                        "(default: whoever signed it, which the verdict names)")
    verify.set_defaults(run=cmd_verify)

    archive_cli.add_parsers(sub)
    fleet.add_parsers(sub)
    nostr_cli.add_parser(sub)
    return p


def _helper_form(argv: list[str]) -> list[str]:
    """`agentfs STORE MOUNTPOINT -o OPTS` (mount.fuse's convention) as a mount command."""
    commands = {"init", "id", "mount", "verify", "export", "import", "nostr",
                *fleet.COMMANDS}
    if len(argv) >= 2 and argv[0] not in commands and not argv[0].startswith("-"):
        return ["mount", "--store", argv[0], argv[1], *argv[2:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(_helper_form(sys.argv[1:] if argv is None else argv))
    try:
        status: int = args.run(args)
    except (ValueError, OSError, ArchiveError) as e:
        print(f"agentfs: {_describe(e)}", file=sys.stderr)
        return 1
    return status


def _describe(e: Exception) -> str:
    if isinstance(e, OSError) and e.errno in DEAD_MOUNT_ERRNOS:
        # Bare, "[Errno 107] Transport endpoint is not connected" says nothing to act on.
        where = "" if e.filename is None else f"{e.filename}: "
        return (f"{where}not connected: a FUSE mount there or above it lost its daemon "
                "(unmount it with fusermount3 -uz)")
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
