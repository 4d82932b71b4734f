"""The `agentfs` command (agentfs(1)): init, recovery, id, mount, shutdown (its mount(8) helper
form, through `mount -t fuse.agentfs` and fstab: test_systemd.py)."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    AGENTFS,
    Mount,
    MountFactory,
    Store,
    errno_of,
    init_store,
    pid_alive,
    sh,
    wait_until,
)
from mnemonic import Mnemonic

from agentfs.identity import npub_decode

CONSOLE_SCRIPT = Path(sys.executable).parent / "agentfs"


def agentfs(*args: str, stdin: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENTFS, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, env=env)


# -- init --------------------------------------------------------------------------------------


def test_init_prints_the_mnemonic_once_and_refuses_an_existing_store(tmp_path: Path) -> None:
    path = tmp_path / "store"
    done = agentfs("init", str(path))
    assert done.returncode == 0
    words = done.stdout.split()
    assert len(words) == 24 and done.stdout == " ".join(words) + "\n"
    assert Mnemonic("english").check(" ".join(words))
    assert len(done.stderr.splitlines()) == 1 and "Write down" in done.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    data = (path / "data.mdb").read_bytes()
    mnemonic_file = tmp_path / "words"
    mnemonic_file.write_text(done.stdout)
    for args in [["init", str(path)], ["init", "--mnemonic-file", str(mnemonic_file), str(path)]]:
        again = agentfs(*args)
        assert again.returncode == 1 and again.stdout == ""
        assert again.stderr == f"agentfs: {path}: a store already exists\n"
    assert (path / "data.mdb").read_bytes() == data
    # Two stores never share a mnemonic.
    assert agentfs("init", str(tmp_path / "other")).stdout != done.stdout


def test_init_default_store_locations(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("AGENTFS_STORE", "XDG_DATA_HOME")}
    cases = [
        ({"AGENTFS_STORE": str(tmp_path / "env-store"), "XDG_DATA_HOME": str(tmp_path / "x")},
         tmp_path / "env-store"),
        ({"XDG_DATA_HOME": str(tmp_path / "xdg")}, tmp_path / "xdg" / "agentfs"),
        ({"HOME": str(tmp_path / "home")}, tmp_path / "home" / ".local/share/agentfs"),
    ]
    for extra, where in cases:
        done = agentfs("init", env={**base, **extra})
        assert done.returncode == 0, done.stderr
        assert (where / "data.mdb").exists(), where


def test_init_refuses_a_bad_mnemonic(tmp_path: Path) -> None:
    words = Mnemonic("english").generate(256).split()
    bad_file = tmp_path / "bad"
    for bad in [words[:23], [*words[:23], "notaword"], [*words[:23], words[0]]]:
        bad_file.write_text(" ".join(bad))
        done = agentfs("init", "--mnemonic-file", str(bad_file), str(tmp_path / "s"))
        assert done.returncode == 1 and done.stderr.startswith("agentfs: "), bad
        assert not (tmp_path / "s" / "data.mdb").exists()


def test_recovery_gives_the_same_npubs_in_the_same_order(make_mount: MountFactory,
                                                         tmp_path: Path) -> None:
    first = make_mount("a")
    npubs = [first.new_agent(name) for name in ("x", "y", "z")]
    words = tmp_path / "words"
    # Recovery takes the words however they were written down.
    words.write_text("\n".join(first.store.mnemonic.upper().split()) + "\n")
    recovered = tmp_path / "b-store"
    done = agentfs("init", "--mnemonic-file", str(words), str(recovered))
    assert done.returncode == 0 and done.stdout == "", done.stderr
    second = make_mount("b", Store(recovered, first.store.mnemonic))
    assert [second.new_agent(name) for name in ("p", "q", "r")] == npubs
    from_stdin = tmp_path / "c-store"
    done = agentfs("init", "--mnemonic-file", "-", str(from_stdin), stdin=first.store.mnemonic)
    assert done.returncode == 0, done.stderr
    third = make_mount("c", Store(from_stdin, first.store.mnemonic))
    fd = os.open(third.mp / "ctl", os.O_RDWR)
    try:
        os.write(fd, b"new one\nnew two\nnew three\n")
        assert os.read(fd, 4096).decode().split() == npubs
    finally:
        os.close(fd)


# -- id ----------------------------------------------------------------------------------------


NIP06 = json.loads((Path(__file__).parent / "vectors" / "nip06.json").read_text())


@pytest.mark.parametrize("vector", NIP06["vectors"], ids=lambda v: v["npub"][:12])
def test_id_reproduces_the_nip06_vectors(vector: dict[str, str], tmp_path: Path) -> None:
    # NIP-06's vectors are for m/44'/1237'/0'/0/0: the user's key.
    words = tmp_path / "mnemonic"
    words.write_text(vector["mnemonic"] + "\n")
    done = agentfs("id", "--mnemonic-file", str(words), "--user")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{vector['npub']} {vector['public_key_hex']}\n"
    from_stdin = agentfs("id", "--mnemonic-file", "-", "--user", stdin=vector["mnemonic"])
    assert from_stdin.stdout == done.stdout
    # The private key never appears in what the command prints.
    assert vector["private_key_hex"] not in done.stdout + done.stderr


def test_id_matches_the_agents_in_the_tree(mount: Mount, tmp_path: Path) -> None:
    npubs = [mount.new_agent(name) for name in ("x", "y", "z")]
    words = tmp_path / "words"
    words.write_text(mount.store.mnemonic + "\n")
    for n, npub in enumerate(npubs):
        done = agentfs("id", "--mnemonic-file", str(words), "--agent", str(n))
        assert done.returncode == 0
        assert done.stdout == f"{npub} {npub_decode(npub).hex()}\n"
    assert os.readlink(mount.mp / "y") == npubs[1]
    user = agentfs("id", "--mnemonic-file", "-", "--user", stdin=mount.store.mnemonic)
    assert user.returncode == 0
    npub, hexkey = user.stdout.split()
    assert npub.startswith("npub1") and npub not in npubs and len(hexkey) == 64
    for args in [["id", "--mnemonic-file", str(words)],
                 ["id", "--mnemonic-file", str(words), "--user", "--agent", "0"]]:
        assert agentfs(*args).returncode == 2


# -- mount -------------------------------------------------------------------------------------


def test_a_second_mount_of_the_same_store_is_refused(mount: Mount, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    done = agentfs("mount", "--store", str(mount.store.path), str(other))
    assert done.returncode == 1
    assert done.stderr.strip() == f"agentfs: {mount.store.path} is in use by pid {mount.pid}"
    assert not os.path.ismount(other)
    assert pid_alive(mount.pid)
    mount.new_agent("still-served")
    assert int((mount.store.path / "daemon.pid").read_text()) == mount.pid


def test_mount_errors(store: Store, tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    cases = [
        (["--store", str(tmp_path / "nothing"), str(mp)], "no store here"),
        (["--store", str(store.path), str(tmp_path / "missing")], "not a directory"),
        (["--store", str(store.path), "-o", "bogus", str(mp)], "unknown mount option"),
        (["--store", str(store.path), "-o", "durability=fast", str(mp)],
         "durability=fast: say durability=disk"),
    ]
    for args, message in cases:
        done = agentfs("mount", *args)
        assert done.returncode == 1 and message in done.stderr, args
        assert not os.path.ismount(mp)


def mounts_on(path: Path) -> list[str]:
    """The type of each mount on `path`, from /proc/self/mountinfo (stacked ones too)."""
    return [line.partition(" - ")[2].split()[0]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == str(path)]


def test_mount_clears_the_dead_mount_a_killed_daemon_left(mount: Mount) -> None:
    npub = mount.new_agent("survivor")
    mount.kill()
    # Dead, as kill -9 leaves it (ECONNABORTED while the daemon's last threads go).
    assert errno_of(lambda: os.listdir(mount.mp)) in (errno.ENOTCONN, errno.ECONNABORTED)
    # Nothing under the dead mount gets a bare "[Errno 107]".
    for args in (["mount", "--store", str(mount.store.path), str(mount.mp / "sub")],
                 ["init", str(mount.mp / "store")]):
        done = agentfs(*args)
        assert done.returncode == 1 and "Errno" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"agentfs: {mount.mp}/") and \
            "not connected" in done.stderr and "fusermount3 -uz" in done.stderr, done.stderr
    done = agentfs("mount", "--store", str(mount.store.path), str(mount.mp))
    assert done.returncode == 0, done.stderr
    assert done.stderr == (f"agentfs: {mount.mp}: cleared a dead mount of {mount.store.path} "
                           "(its daemon was gone) with fusermount3 -uz\n")
    mount.pid = int((mount.store.path / "daemon.pid").read_text())
    assert pid_alive(mount.pid)
    assert mounts_on(mount.mp) == ["fuse.agentfs"]  # the dead one gone, not stacked under
    assert sh(f"cat {mount.mp}/survivor/ctl").stdout.splitlines()[0] == f"npub {npub}"
    mount.new_agent("after")


def test_mount_on_a_live_mount_is_refused(mount: Mount, tmp_path: Path) -> None:
    other = init_store(tmp_path / "other-store")
    done = agentfs("mount", "--store", str(other.path), str(mount.mp))
    assert done.returncode == 1
    assert done.stderr == (f"agentfs: {mount.mp}: already a mount point (fuse.agentfs of "
                           f"{mount.store.path}); unmount it first\n")
    assert mounts_on(mount.mp) == ["fuse.agentfs"] and pid_alive(mount.pid)
    mount.new_agent("still-served")
    # A live mount of anything else is refused as well, and no daemon starts.
    plain = tmp_path / "tmpfs"
    plain.mkdir()
    sh(f"mount -t tmpfs agentfs-test {plain}")
    try:
        done = agentfs("mount", "--store", str(other.path), str(plain))
        assert done.returncode == 1
        assert done.stderr == (f"agentfs: {plain}: already a mount point (tmpfs of "
                               "agentfs-test); unmount it first\n")
        assert mounts_on(plain) == ["tmpfs"]
    finally:
        sh(f"umount {plain}")
    assert not (other.path / "daemon.pid").exists()


def test_sigterm_unmounts_cleanly_and_the_store_reopens(mount: Mount) -> None:
    mount.new_agent("alice")
    sh(f"echo kept > {mount.mp}/alice/state/k")
    os.kill(mount.pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(mount.pid), 10, "the daemon to exit on SIGTERM")
    assert not os.path.ismount(mount.mp)
    log = (mount.store.path / "daemon.log").read_text()
    assert "signal 15: unmounting" in log and log.rstrip().endswith(f"unmounted {mount.mp}")
    assert (mount.store.path / "daemon.pid").read_text() == ""
    mount.start()
    assert (mount.mp / "alice/state/k").read_text() == "kept\n"
    assert mount.status("alice")["name"] == "alice"


# -- help --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["init"], ["id"], ["mount"]])
def test_help(command: list[str]) -> None:
    done = subprocess.run([str(CONSOLE_SCRIPT), *command, "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith(f"usage: agentfs {' '.join(command)}".rstrip())


def test_no_command_is_a_usage_error() -> None:
    done = agentfs()
    assert done.returncode == 2 and "usage: agentfs" in done.stderr


def test_a_daemon_whose_starter_is_gone_serves_all_the_same(store: Store, tmp_path: Path) -> None:
    # `agentfs mount` waits on a pipe for the daemon's word; if the waiter is gone by then
    # (killed, say), the daemon must not die of the broken pipe and leave a dead mount.
    mp = tmp_path / "mp"
    mp.mkdir()
    starter = ("import os, sys; from pathlib import Path; from agentfs import daemon; "
               "r, w = os.pipe(); os.close(r); "
               "sys.exit(daemon.serve(Path(sys.argv[1]), Path(sys.argv[2]), [], 1, w))")
    log = tmp_path / "daemon.err"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", starter, str(store.path), str(mp)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: "did not wait for it" in log.read_text(), 15, "the report")
        assert "ctl" in os.listdir(mp) and os.path.ismount(mp)
        assert proc.poll() is None  # still serving
    finally:
        sh(f"fusermount3 -u {mp}", check=False)
        proc.wait(30)
    assert proc.returncode == 0
