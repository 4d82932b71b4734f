"""`agentfs export` and `agentfs import`: an agent to a tar on standard output, and back.

Export reads the store directly, in one LMDB read transaction, whether or not a daemon
serves it (LMDB lets readers in beside the writer): that is one commit's snapshot of every
member, and it holds what the mounted tree never shows (the key, seen ids, counters).
Import writes the store, so it takes the store's lock as a daemon does: not while mounted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import archive
from .archive import ArchiveError
from .keyring import agent_secret
from .nostr import nip49
from .store import AgentStore, StoreInUse, default_store_path

MAX_PASSPHRASE = 4096


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = sub.add_parser(
        "export", help="write an agent's archive (a tar) on standard output",
        description="Write agent NAME (a name or an npub) of a store as a tar on standard "
                    "output: its state, queues, log, budget, settings, alarm, capabilities "
                    "and a manifest of checksums. See agentfs(1).")
    export.add_argument("mountpoint", nargs="?", help="a mount of the store (instead of "
                        "--store)")
    export.add_argument("name", help="the agent's name or npub")
    export.add_argument("--store", help="store directory (default as for init)")
    export.add_argument("--with-key", action="store_true",
                        help="include the agent's private key, encrypted under a passphrase "
                             "(NIP-49 ncryptsec), to move it to a store of another mnemonic")
    export.add_argument("--passphrase-fd", type=int, metavar="N",
                        help="read the passphrase from file descriptor N, not the terminal")
    export.add_argument("--log-n", type=int, default=nip49.DEFAULT_LOG_N, metavar="N",
                        help=f"scrypt cost 2**N for the key (default {nip49.DEFAULT_LOG_N}, "
                             f"at most {nip49.MAX_LOG_N})")
    export.set_defaults(run=cmd_export)

    imp = sub.add_parser(
        "import", help="recreate an exported agent in a store",
        description="Recreate the agent of ARCHIVE (a file, or - for standard input) in a "
                    "store that no daemon serves. See agentfs(1).")
    imp.add_argument("archive")
    imp.add_argument("--store", help="store directory (default as for init)")
    imp.add_argument("--name", metavar="NEW", help="the agent's name here (default: its own)")
    imp.add_argument("--passphrase-fd", type=int, metavar="N",
                     help="read the key's passphrase from file descriptor N, not the terminal")
    imp.set_defaults(run=cmd_import)


def _store_of_mount(mountpoint: str) -> Path:
    from .cli import mounts_at

    mounts = mounts_at(os.path.realpath(mountpoint))
    if not mounts or mounts[-1][0] != "fuse.agentfs":
        raise ArchiveError(f"{mountpoint}: not an agentfs mount (give --store STORE)")
    return Path(mounts[-1][1])


def cmd_export(args: argparse.Namespace) -> int:
    if args.mountpoint is not None and args.store is not None:
        raise ArchiveError("give --store STORE or MOUNTPOINT, not both")
    if args.passphrase_fd is not None and not args.with_key:
        raise ArchiveError("--passphrase-fd is for --with-key: without it no key is written")
    if sys.stdout.isatty():
        raise ArchiveError("standard output is a terminal: redirect the archive to a file "
                           f"(agentfs export {args.name} > {args.name}.tar)")
    if not nip49.MIN_LOG_N <= args.log_n <= nip49.MAX_LOG_N:
        raise ArchiveError(f"--log-n {args.log_n}: use {nip49.MIN_LOG_N}-{nip49.MAX_LOG_N}")
    store_path = _store_of_mount(args.mountpoint) if args.mountpoint else \
        Path(args.store) if args.store else default_store_path()
    store = AgentStore.open(store_path)
    try:
        with store.read() as txn:
            archive.find_agent(store, txn, args.name)  # before asking for a passphrase
        passphrase = _passphrase(args.passphrase_fd, confirm=True) if args.with_key else None
        with store.read() as txn:
            record = archive.find_agent(store, txn, args.name)
            key = None
            if passphrase is not None:
                key = nip49.encrypt(agent_secret(store, txn, record.index), passphrase,
                                    args.log_n)
            members = archive.snapshot(store, txn, record, key)
    finally:
        store.close()
    archive.write(members, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    files = sum(1 for m in members if m.name.startswith("state/") and m.data is not None)
    print(f"agentfs: exported {record.name} {record.npub} (agent {record.index}; "
          f"{files} state files{', its key encrypted' if key else ''})", file=sys.stderr)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    store_path = Path(args.store) if args.store else default_store_path()
    if args.archive == "-":
        got = archive.read(sys.stdin.buffer)
    else:
        with open(args.archive, "rb") as f:
            got = archive.read(f)
    store = AgentStore.open(store_path)
    try:
        try:
            store.lock()
        except StoreInUse as e:
            raise ArchiveError(f"{e}: unmount it before importing") from None
        with store.read() as txn:  # refuse what can be refused before asking a passphrase
            spot = archive.place(store, txn, got)
            archive.check_name(store, txn, args.name or got.manifest.get("name"))
            notes = archive.missing_secrets(store, txn, got)
        private = None
        if spot.needs_key:
            assert got.key is not None
            passphrase = _passphrase(args.passphrase_fd, confirm=False)
            try:
                private, _security = nip49.decrypt(got.key, passphrase)
            except ValueError as e:
                raise ArchiveError(str(e)) from None
        with store.env.begin(write=True) as txn:
            record = archive.install(store, txn, got, args.name, private)
    finally:
        store.close()
    how = "its key imported, sealed in the store" if spot.needs_key else \
        "its key derived from this store's mnemonic"
    print(f"agentfs: imported {record.name} {record.npub} as agent {record.index} ({how})",
          file=sys.stderr)
    for note in notes:
        print(f"agentfs: {record.name}: {note}", file=sys.stderr)
    print(record.npub)
    return 0


def _passphrase(fd: int | None, confirm: bool) -> str:
    """From file descriptor `fd` (its first line), else asked on the terminal: never from
    argv or the environment, which other processes can read."""
    if fd is not None:
        raw = b""
        try:
            while b"\n" not in raw and len(raw) <= MAX_PASSPHRASE:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                raw += chunk
        except OSError as e:
            raise ArchiveError(f"--passphrase-fd {fd}: {e.strerror}") from None
        try:
            text = raw.split(b"\n", 1)[0].removesuffix(b"\r").decode()
        except UnicodeDecodeError:
            raise ArchiveError(f"--passphrase-fd {fd}: the passphrase is not UTF-8") from None
    else:
        text = _ask(confirm)
    if not text:
        raise ArchiveError("the passphrase is empty")
    if len(text.encode()) > MAX_PASSPHRASE:
        raise ArchiveError(f"the passphrase is longer than {MAX_PASSPHRASE} bytes")
    return text


def _ask(confirm: bool) -> str:
    import getpass

    try:  # getpass falls back to standard input without a terminal: the archive is there
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        raise ArchiveError("no terminal to ask the passphrase on: give it with "
                           "--passphrase-fd N") from None
    text = getpass.getpass("agentfs: passphrase for the agent's key: ")
    if confirm and getpass.getpass("agentfs: the same passphrase again: ") != text:
        raise ArchiveError("the two passphrases differ")
    return text
