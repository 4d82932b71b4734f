"""`state/` behaves as a disk: shell tools, bytes, and a stateful test against a dict model."""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, errno_of, module_mount, sh
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)


@pytest.fixture
def state(mount: Mount) -> Path:
    mount.new_agent("alice")
    return mount.agent("alice") / "state"


def test_shell_files(state: Path) -> None:
    sh(f"cd {state} && echo hello > k && echo more >> k")
    assert sh(f"cat {state}/k").stdout == "hello\nmore\n"
    assert os.stat(state / "k").st_size == 11
    sh(f"echo replaced > {state}/k")
    assert (state / "k").read_text() == "replaced\n"
    sh(f"truncate -s 3 {state}/k")
    assert (state / "k").read_bytes() == b"rep"
    sh(f"truncate -s 6 {state}/k")
    assert (state / "k").read_bytes() == b"rep\0\0\0"
    sh(f": > {state}/k")
    assert (state / "k").read_bytes() == b""
    sh(f"touch {state}/empty && rm {state}/k")
    assert sh(f"ls {state}").stdout.split() == ["empty"]
    assert errno_of(lambda: (state / "k").read_bytes()) == errno.ENOENT
    done = sh(f"cat {state}/k", check=False)
    assert done.returncode == 1 and "No such file or directory" in done.stderr
    assert stat.S_ISREG(os.stat(state / "empty").st_mode)


def test_shell_directories(state: Path) -> None:
    sh(f"mkdir {state}/d && mkdir -p {state}/d/e/f && echo 1 > {state}/d/e/f/g")
    assert sh(f"ls {state}/d").stdout.split() == ["e"]
    assert sh(f"cd {state} && find . | sort").stdout.split() == \
        [".", "./d", "./d/e", "./d/e/f", "./d/e/f/g"]
    done = sh(f"rmdir {state}/d", check=False)
    assert done.returncode != 0 and "Directory not empty" in done.stderr
    assert errno_of(lambda: os.rmdir(state / "d")) == errno.ENOTEMPTY
    assert errno_of(lambda: os.mkdir(state / "d")) == errno.EEXIST
    assert errno_of(lambda: os.unlink(state / "d")) == errno.EISDIR
    assert errno_of(lambda: os.rmdir(state / "d/e/f/g")) == errno.ENOTDIR
    assert errno_of(lambda: os.mkdir(state / "nope/x")) == errno.ENOENT
    assert errno_of(lambda: os.mkdir(state / "d/e/f/g/x")) == errno.ENOTDIR
    assert errno_of(lambda: (state / "d").write_text("x")) == errno.EISDIR
    sh(f"rm -r {state}/d")
    assert os.listdir(state) == []


def test_shell_moves(state: Path) -> None:
    sh(f"cd {state} && echo a > a && mv a b")
    assert sh(f"ls {state}").stdout.split() == ["b"]
    assert (state / "b").read_text() == "a\n"
    # A directory moves with everything in it.
    sh(f"cd {state} && mkdir -p dir/sub && echo deep > dir/sub/f && echo top > dir/t && "
       "mv dir moved")
    assert sh(f"cd {state} && find moved | sort").stdout.split() == \
        ["moved", "moved/sub", "moved/sub/f", "moved/t"]
    assert (state / "moved/sub/f").read_text() == "deep\n"
    assert errno_of(lambda: os.stat(state / "dir")) == errno.ENOENT
    # Onto an existing file: replaced.
    sh(f"cd {state} && echo new > n && mv -f n b")
    assert (state / "b").read_text() == "new\n" and not (state / "n").exists()
    # Into a directory, and across directories.
    sh(f"cd {state} && mv b moved/ && mv moved/sub/f f")
    assert sorted(os.listdir(state / "moved")) == ["b", "sub", "t"]
    assert (state / "f").read_text() == "deep\n"
    # Onto an empty directory: replaced; onto a non-empty one: refused.
    os.mkdir(state / "empty")
    os.rename(state / "moved/sub", state / "empty")
    assert errno_of(lambda: os.rename(state / "empty", state / "moved")) == errno.ENOTEMPTY
    assert errno_of(lambda: os.rename(state / "f", state / "moved")) == errno.EISDIR
    assert errno_of(lambda: os.rename(state / "moved", state / "f")) == errno.ENOTDIR
    assert errno_of(lambda: os.rename(state / "moved", state / "moved/t2")) == errno.EINVAL
    assert sorted(os.listdir(state)) == ["empty", "f", "moved"]


def test_values_are_bytes(state: Path, tmp_path: Path) -> None:
    blob = os.urandom(300_000) + b"\0\0tail\0"
    source = tmp_path / "blob"
    source.write_bytes(blob)
    sh(f"cp {source} {state}/blob && cmp {source} {state}/blob")
    assert (state / "blob").read_bytes() == blob
    assert os.stat(state / "blob").st_size == len(blob)
    # Writes at offsets, past the end, and in the middle.
    fd = os.open(state / "sparse", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.pwrite(fd, b"\0x\0", 10)
        os.pwrite(fd, b"AB", 1)
    finally:
        os.close(fd)
    assert (state / "sparse").read_bytes() == b"\0AB" + b"\0" * 7 + b"\0x\0"
    fd = os.open(state / "blob", os.O_RDONLY)
    try:
        assert os.pread(fd, 9, len(blob) - 9) == blob[-9:]
        assert os.pread(fd, 5, 1000) == blob[1000:1005]
    finally:
        os.close(fd)
    names = ["with space", "ütf-8 ✓", "a.b.c", "-dash", "x" * 255]
    for name in names:
        (state / name).write_bytes(name.encode() + b"\0")
    assert set(os.listdir(state)) == {"blob", "sparse", *names}
    assert all((state / n).read_bytes() == n.encode() + b"\0" for n in names)
    assert errno_of(lambda: (state / ("y" * 256)).write_bytes(b"")) == errno.ENAMETOOLONG


def test_state_survives_remount(mount: Mount) -> None:
    mount.new_agent("alice")
    state = mount.agent("alice") / "state"
    sh(f"mkdir {state}/d && printf 'v\\0w' > {state}/d/k && echo top > {state}/t")
    mount.restart()
    assert (state / "d/k").read_bytes() == b"v\0w"
    assert sorted(os.listdir(state)) == ["d", "t"]


# -- the stateful test --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    yield from module_mount(tmp_path_factory, "state-machine")


NAMES = st.sampled_from(["a", "b", "c"])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map("/".join)
DATA = st.binary(max_size=40)


class StateModel(RuleBasedStateMachine):
    """Every operation through the mount, checked against a dict of files and a set of dirs."""

    mount: Mount
    agents = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.root = self.mount.agent(self.mount.new_agent(f"m{next(self.agents)}")) / "state"
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = set()

    # -- the model's view of paths --

    def kind(self, path: str) -> str | None:
        if path == "" or path in self.dirs:
            return "dir"
        return "file" if path in self.files else None

    def walk_error(self, path: str) -> int | None:
        """The errno of resolving `path`'s parent directories, as the kernel's walk gives it."""
        parts = path.split("/")
        for i in range(1, len(parts)):
            kind = self.kind("/".join(parts[:i]))
            if kind is None:
                return errno.ENOENT
            if kind == "file":
                return errno.ENOTDIR
        return None

    def children(self, path: str) -> set[str]:
        prefix = path + "/" if path else ""
        return {p[len(prefix):] for p in (*self.files, *self.dirs)
                if p.startswith(prefix) and "/" not in p[len(prefix):]}

    def check(self, expected: int | None, call: object) -> object:
        assert callable(call)
        try:
            result = call()
        except OSError as e:
            assert e.errno == expected, f"errno {errno.errorcode.get(e.errno or 0)}, " \
                f"expected {errno.errorcode.get(expected or 0, 'success')}"
            return None
        assert expected is None, f"succeeded; expected {errno.errorcode[expected]}"
        return result

    def leaf_error(self, path: str, want: str) -> int | None:
        error = self.walk_error(path)
        if error is None:
            kind = self.kind(path)
            if kind is None:
                error = errno.ENOENT
            elif kind != want:
                error = errno.EISDIR if kind == "dir" else errno.ENOTDIR
        return error

    # -- rules --

    @rule(path=PATHS, data=DATA)
    def write(self, path: str, data: bytes) -> None:
        error = self.walk_error(path) or (errno.EISDIR if self.kind(path) == "dir" else None)
        self.check(error, lambda: (self.root / path).write_bytes(data))
        if error is None:
            self.files[path] = data

    @rule(path=PATHS, data=DATA)
    def append(self, path: str, data: bytes) -> None:
        error = self.walk_error(path) or (errno.EISDIR if self.kind(path) == "dir" else None)

        def append() -> None:
            with open(self.root / path, "ab") as f:
                f.write(data)

        self.check(error, append)
        if error is None:
            self.files[path] = self.files.get(path, b"") + data

    @rule(path=PATHS)
    def read(self, path: str) -> None:
        error = self.leaf_error(path, "file")
        got = self.check(error, lambda: (self.root / path).read_bytes())
        if error is None:
            assert got == self.files[path]

    @rule(path=PATHS, size=st.integers(0, 50))
    def truncate(self, path: str, size: int) -> None:
        error = self.leaf_error(path, "file")
        self.check(error, lambda: os.truncate(self.root / path, size))
        if error is None:
            old = self.files[path]
            self.files[path] = old[:size] + b"\0" * (size - len(old))

    @rule(path=PATHS)
    def unlink(self, path: str) -> None:
        error = self.leaf_error(path, "file")
        self.check(error, lambda: os.unlink(self.root / path))
        if error is None:
            del self.files[path]

    @rule(path=PATHS)
    def mkdir(self, path: str) -> None:
        error = self.walk_error(path) or (errno.EEXIST if self.kind(path) else None)
        self.check(error, lambda: os.mkdir(self.root / path))
        if error is None:
            self.dirs.add(path)

    @rule(path=PATHS)
    def rmdir(self, path: str) -> None:
        error = self.leaf_error(path, "dir")
        if error is None and self.children(path):
            error = errno.ENOTEMPTY
        self.check(error, lambda: os.rmdir(self.root / path))
        if error is None:
            self.dirs.discard(path)

    @rule(src=PATHS, dst=PATHS)
    def rename(self, src: str, dst: str) -> None:
        error = self.rename_error(src, dst)
        self.check(error, lambda: os.rename(self.root / src, self.root / dst))
        if error is None and src != dst:
            moved_files = {p: v for p, v in self.files.items()
                           if p == src or p.startswith(src + "/")}
            moved_dirs = {p for p in self.dirs if p == src or p.startswith(src + "/")}
            self.files.pop(dst, None)
            self.dirs.discard(dst)
            for p in moved_files:
                del self.files[p]
            self.dirs -= moved_dirs
            self.files.update({dst + p[len(src):]: v for p, v in moved_files.items()})
            self.dirs |= {dst + p[len(src):] for p in moved_dirs}

    def rename_error(self, src: str, dst: str) -> int | None:
        error = self.walk_error(src) or self.walk_error(dst)
        if error is None and self.kind(src) is None:
            error = errno.ENOENT
        if error is not None or src == dst:
            return error
        source, target = self.kind(src), self.kind(dst)
        if source == "dir" and dst.startswith(src + "/"):
            return errno.EINVAL
        if src.startswith(dst + "/"):
            return errno.ENOTEMPTY  # the target is an ancestor of the source
        if target == "dir" and source == "file":
            return errno.EISDIR
        if target == "file" and source == "dir":
            return errno.ENOTDIR
        if target == "dir" and self.children(dst):
            return errno.ENOTEMPTY
        return None

    @precondition(lambda self: self.dirs)
    @rule(data=st.data())
    def listdir(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(sorted(self.dirs)))
        assert set(os.listdir(self.root / path)) == self.children(path)

    @invariant()
    def tree_matches(self) -> None:
        """The whole tree, every file's bytes included, is the model's."""
        files: dict[str, bytes] = {}
        dirs: set[str] = set()
        for top, subdirs, names in os.walk(self.root):
            rel = os.path.relpath(top, self.root)
            prefix = "" if rel == "." else rel + "/"
            dirs.update(prefix + d for d in subdirs)
            files.update({prefix + n: (Path(top) / n).read_bytes() for n in names})
        assert dirs == self.dirs
        assert files == self.files
        agent = self.root.parent

        def journals() -> int:
            return sum((agent / j).stat().st_size for j in ("outbox", "log"))

        # The journals count in the storage; a report of refusals not logged one by one
        # may be added to the log meanwhile (agentfs/refusals.py): read until it was not.
        while True:
            before, budget, after = journals(), (agent / "budget").read_text(), journals()
            if before == after:
                break
        assert f"\nused_storage_bytes {sum(map(len, files.values())) + after}\n" in budget


def test_state_machine_against_a_dict(shared_mount: Mount) -> None:
    StateModel.mount = shared_mount
    run_state_machine_as_test(StateModel, settings=settings(
        max_examples=30, stateful_step_count=40, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    # The machine's final agent reads the same after a remount: the model's writes were durable.
    last = shared_mount.mp / f"m{next(StateModel.agents) - 1}" / "state"
    before = sh(f"cd {last} && find . -type f -exec md5sum {{}} + | sort").stdout
    shared_mount.restart()
    assert sh(f"cd {last} && find . -type f -exec md5sum {{}} + | sort").stdout == before

