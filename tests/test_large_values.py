"""Large `state/` values: stored in chunks, replaced whole at close, never left as a prefix."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from conftest import READ_TRIGGER, Mount, MountFactory, script, sh, wait_until, write_once

from agentfs.store import AgentStore

MiB = 1 << 20
# Writes `size` random bytes to a file in 1 MiB writes, says so, and closes it only when
# its standard input ends: a writer caught in the middle of its value.
WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
for _ in range(int(sys.argv[2])):
    os.write(fd, os.urandom(1 << 20))
print("written", flush=True)
sys.stdin.read()
try:
    os.close(fd)
except OSError as e:
    print(e.strerror, flush=True)
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def stored_chunks(store: Path) -> tuple[int, int]:
    """(chunks, drafts) in an unmounted store."""
    s = AgentStore.open(store)
    try:
        with s.read() as txn:
            return (txn.stat(s.db["chunks"])["entries"], txn.stat(s.db["drafts"])["entries"])
    finally:
        s.close()


def test_a_large_value_round_trips(mount: Mount, tmp_path: Path) -> None:
    """dd and cat write and read a 24 MiB value byte for byte; a write into its middle
    changes only those bytes; the map grew on the way (it starts at 8 MiB)."""
    mount.new_agent("big")
    state = mount.agent("big") / "state"
    local = random_file(tmp_path / "local", 24 * MiB + 123)
    sh(f"dd if={local} of={state}/v bs=1M status=none")
    assert os.stat(state / "v").st_size == local.stat().st_size
    assert sh(f"sha256sum < {state}/v").stdout.split()[0] == sha256(local)
    sh(f"cat {local} > {state}/copy")
    assert sh(f"dd if={state}/copy bs=1M status=none | sha256sum").stdout.split()[0] == \
        sha256(local)
    # 3 bytes across a chunk boundary, in place (conv=notrunc), then an append.
    sh(f"printf XYZ | dd of={state}/v bs=1 seek={256 * 1024 - 1} conv=notrunc status=none")
    sh(f"printf tail >> {state}/v")
    data = bytearray(local.read_bytes())
    data[256 * 1024 - 1:256 * 1024 + 2] = b"XYZ"
    data += b"tail"
    assert (state / "v").read_bytes() == bytes(data)
    sh(f"truncate -s 300000 {state}/v")
    assert (state / "v").read_bytes() == bytes(data[:300000])
    assert "the store's map grew" in (mount.store.path / "daemon.log").read_text()
    mount.restart()
    assert sha256(state / "copy") == sha256(local)


def test_a_crash_mid_write_leaves_the_old_value(mount: Mount, tmp_path: Path) -> None:
    """kill -9 while a 12 MiB value is half written: after the restart the old value is
    there, and what the writer staged is gone from the store."""
    mount.new_agent("crash")
    value = mount.agent("crash") / "state" / "v"
    sh(f"echo old > {value}")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(value), "12"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "written\n"
        assert value.read_bytes() == b"old\n"  # others see the old value meanwhile
        mount.kill()
    finally:
        writer.communicate(timeout=30)
    mount.stop()
    mount.start()
    assert value.read_bytes() == b"old\n"
    mount.stop()
    assert stored_chunks(mount.store.path) == (1, 0)
    mount.start()


def test_edquot_midway_leaves_the_old_value(mount: Mount, tmp_path: Path) -> None:
    """A value that passes max_storage_bytes at its fourth MiB: the write fails with
    EDQUOT, the close too, and the old value stands; the log says why."""
    mount.new_agent("quota")
    agent = mount.agent("quota")
    sh(f"echo old > {agent}/state/v")
    sh(f"echo 'max_storage_bytes {3 * MiB}' > {agent}/budget")
    local = random_file(tmp_path / "local", 8 * MiB)
    done = sh(f"dd if={local} of={agent}/state/v bs=1M status=none", check=False)
    assert done.returncode != 0 and "Disk quota exceeded" in done.stderr
    assert (agent / "state" / "v").read_bytes() == b"old\n"
    refused = [e for e in mount.log("quota") if e["event"] == "refused"]
    assert refused[0]["errno"] == "EDQUOT" and "max_storage_bytes" in refused[0]["error"]
    sh(f"echo new > {agent}/state/v")  # what the limit allows still goes
    assert (agent / "state" / "v").read_bytes() == b"new\n"
    mount.stop()
    assert stored_chunks(mount.store.path) == (1, 0)
    mount.start()


def test_a_full_map_gives_enospc(make_mount: MountFactory, tmp_path: Path) -> None:
    """With the map at its largest (-o map_size), a value that does not fit fails with
    ENOSPC, daemon.log says so in a line (no traceback), and the old value stands."""
    m = make_mount("full", args=("-o", "map_size=24MiB"))
    m.new_agent("full")
    state = m.agent("full") / "state"
    sh(f"echo old > {state}/v")
    local = random_file(tmp_path / "local", 40 * MiB)
    done = sh(f"dd if={local} of={state}/v bs=1M status=none", check=False)
    assert done.returncode != 0 and "No space left on device" in done.stderr
    assert (state / "v").read_bytes() == b"old\n"
    log = (m.store.path / "daemon.log").read_text()
    assert "the store's map is full at" in log
    refused = [e for e in m.log("full") if e["event"] == "refused"]
    assert refused and refused[0]["errno"] == "ENOSPC"
    small = random_file(tmp_path / "small", 2 * MiB)  # the space it took is free again
    sh(f"cp {small} {state}/w")
    assert sha256(state / "w") == sha256(small)


def test_a_tick_writes_a_large_value(mount: Mount, tmp_path: Path) -> None:
    """A tick's value goes through its own view (invisible until it commits), in chunks
    too; the tick reads back what it wrote."""
    program = tmp_path / "writer.sh"
    program.write_text('#!/bin/sh\nset -e\n'
                       'head -c 5000000 /dev/urandom > "$AGENT_DIR/state/big"\n'
                       'sha256sum < "$AGENT_DIR/state/big" > "$AGENT_DIR/state/sum"\n'
                       'printf more >> "$AGENT_DIR/state/big"\n')
    program.chmod(0o755)
    mount.new_agent("ticker", str(program))
    assert mount.created("ticker")["status"] == "active"
    state = mount.agent("ticker") / "state"
    wait_until(lambda: (state / "sum").exists(), 30, "the tick's commit")
    big = (state / "big").read_bytes()
    assert len(big) == 5000000 + 4 and big.endswith(b"more")
    assert hashlib.sha256(big[:-4]).hexdigest() == (state / "sum").read_text().split()[0]


def test_a_failed_tick_keeps_its_checkpoint_of_a_large_value(mount: Mount,
                                                             tmp_path: Path) -> None:
    """A tick writes 3 MB, checkpoints, overwrites and grows the value, and fails: the value
    is what the checkpoint committed, and nothing the failed part wrote is left stored."""
    program = script(tmp_path, "steps.sh", READ_TRIGGER + """
d="$AGENT_DIR/state"
[ -e "$1/ran" ] && exit 0
touch "$1/ran"
head -c 3000000 /dev/urandom > "$d/big"
sha256sum < "$d/big" > "$d/sum"
echo checkpoint > "$AGENT_DIR/ctl"
printf overwritten | dd of="$d/big" conv=notrunc status=none
head -c 2000000 /dev/zero >> "$d/big"
exit 1
""")
    mount.new_agent("steps", program, str(tmp_path))
    mount.created("steps")
    write_once(mount.agent("steps") / "inbox", "go\n")
    mount.wait_ticks("steps", 2, timeout=60)  # failed once, then its retry did nothing
    state = mount.agent("steps") / "state"
    big = (state / "big").read_bytes()
    assert len(big) == 3000000
    assert hashlib.sha256(big).hexdigest() == (state / "sum").read_text().split()[0]
    mount.stop()
    chunks, drafts = stored_chunks(mount.store.path)
    assert (chunks, drafts) == (-(-3000000 // (256 * 1024)) + 1, 0)
    mount.start()


def test_a_version_2_store_has_its_values_moved_to_chunks(mount: Mount) -> None:
    """Version 2 kept a value in its entry (`f + mtime + bytes`): mounted, the store is
    migrated, and the values read the same (one over a chunk), with the directories."""
    mount.new_agent("old")
    mount.stop()
    big = os.urandom(300 * 1024)
    s = AgentStore.open(mount.store.path)
    try:
        with s.env.begin(write=True) as txn:
            mtime = (1 << 60).to_bytes(8, "big")
            for path, raw in ((b"\0small", b"f" + mtime + b"hello\n"), (b"\0dir", b"d" + mtime),
                              (b"dir\0big", b"f" + mtime + big), (b"\0empty", b"f" + mtime)):
                txn.put(b"\0\0\0\0" + path, raw, db=s.db["state"])
            txn.put(b"version", b"2", db=s.db["meta"])
    finally:
        s.close()
    mount.start()
    state = mount.agent("old") / "state"
    assert sorted(os.listdir(state)) == ["dir", "empty", "small"]
    assert (state / "small").read_bytes() == b"hello\n"
    assert (state / "dir" / "big").read_bytes() == big
    assert (state / "empty").read_bytes() == b""
    sh(f"printf more >> {state}/dir/big")
    assert (state / "dir" / "big").read_bytes() == big + b"more"
