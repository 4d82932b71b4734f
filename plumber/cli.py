"""plumb(1) for agentfs: send plumb messages to a mounted tree's plumb/send."""

from __future__ import annotations

import argparse
import os
import sys

from plumber.message import Message, MessageError, unpack_attr


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="plumb",
        description="Send each DATA argument (or standard input, with -i) as one plumb message "
                    "to MOUNTPOINT/plumb/send, where the plumbing rules route it. See plumb(1).")
    p.add_argument("-m", "--mount", default=os.environ.get("AGENTFS_MOUNT"),
                   help="the agentfs mount point (default: $AGENTFS_MOUNT)")
    p.add_argument("-s", dest="src", default="plumb", help="source (default: plumb)")
    p.add_argument("-d", dest="dst", default="", help="destination port")
    p.add_argument("-w", dest="wdir", default=os.getcwd(), help="working directory")
    p.add_argument("-t", dest="type", default="text", help="type (default: text)")
    p.add_argument("-a", dest="attr", default="", help="attributes: 'name=value ...'")
    p.add_argument("-i", dest="stdin", action="store_true",
                   help="send standard input as the data of one message")
    p.add_argument("data", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.mount:
        print("plumb: no mount point: give -m MOUNTPOINT or set $AGENTFS_MOUNT", file=sys.stderr)
        return 2
    if args.stdin == bool(args.data):
        print("plumb: give DATA arguments or -i, not both or neither", file=sys.stderr)
        return 2
    texts = [sys.stdin.read()] if args.stdin else args.data
    try:
        attr = unpack_attr(args.attr)
        wire = b"".join(Message(args.src, args.dst, args.wdir, args.type, dict(attr),
                                text).to_wire() for text in texts)
    except MessageError as e:
        print(f"plumb: {e}", file=sys.stderr)
        return 2
    path = os.path.join(args.mount, "plumb", "send")
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, wire)
        finally:
            os.close(fd)
    except OSError as e:
        print(f"plumb: {path}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
