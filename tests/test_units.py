"""Level 0: units, ctl and budget parsing, and the store's tables on a real LMDB."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentfs import budget, ctl, errors, state, values
from agentfs.inbox import Inbox, parse_lines
from agentfs.journal import Journal
from agentfs.overlay import TickOverlay
from agentfs.store import AgentRecord, AgentStore
from agentfs.tree import ROOT_FILES
from agentfs.units import format_duration, parse_duration, parse_size


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AgentStore]:
    s = AgentStore.create(tmp_path / "store", "abandon " * 11 + "about")
    yield s
    s.close()


def refused(code: int) -> pytest.RaisesExc[errors.FsError]:
    return pytest.raises(errors.FsError, check=lambda e: e.errno == code)


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30), ("1h", 3600), ("250ms", 0.25), ("2m", 120), ("1d", 86400), ("5", 5),
    ("1.5s", 1.5)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("text, size", [
    ("100MB", 100_000_000), ("1MiB", 1 << 20), ("10", 10), ("2KB", 2000), ("1GiB", 1 << 30),
    ("7B", 7)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "30x", "-1s", "1..2s", "s"])
def test_bad_durations_are_einval(text: str) -> None:
    with refused(errno.EINVAL):
        parse_duration(text)


@pytest.mark.parametrize("text", ["1.5B", "10 parsecs", "MB"])
def test_bad_sizes_are_einval(text: str) -> None:
    with refused(errno.EINVAL):
        parse_size(text)


def test_budget_settings() -> None:
    got = budget.parse_settings("max_tick_duration 2m\nmax_storage_bytes 1MiB\n\n")
    assert got == {"max_tick_duration": 120.0, "max_storage_bytes": float(1 << 20)}


@pytest.mark.parametrize("text", [
    "max_tick_duration", "nonsense 5", "max_tick_duration 0s", "warning_threshold 1.5",
    "max_daily_api_calls 2.5", "max_tick_duration 5s extra", ""])
def test_bad_budget_lines(text: str) -> None:
    with refused(errno.EINVAL):
        budget.parse_settings(text)


def test_budget_render_lists_every_limit_and_usage() -> None:
    text = budget.render(AgentRecord(0, "00" * 32, limits={"max_tick_duration": 5.0}), 42)
    lines = dict(line.split(" ", 1) for line in text.splitlines())
    assert lines["max_tick_duration"] == "5s"
    assert lines["used_storage_bytes"] == "42"
    assert {lim.key for lim in budget.LIMITS} <= lines.keys()


def test_agent_ctl_parses_several_commands() -> None:
    commands = ctl.parse_agent_ctl(b"wake hello world\nprogram /bin/sh -c 'echo hi'\nsleep\n")
    assert [c.verb for c in commands] == ["wake", "program", "sleep"]
    assert commands[0].text == "hello world"
    assert commands[1].args == ("/bin/sh", "-c", "echo hi")


@pytest.mark.parametrize("line", [
    b"explode", b"name", b"name a b", b"name .hidden", b"name npub1abc", b"sleep now",
    b"program", b"program 'unclosed", b"", b"\xff\xfe"])
def test_agent_ctl_refuses_malformed(line: bytes) -> None:
    with refused(errno.EINVAL):
        ctl.parse_agent_ctl(line)


@pytest.mark.parametrize("name", sorted({f.name for f in ROOT_FILES} | {".tick"}))
def test_a_root_file_name_is_reserved(name: str) -> None:
    assert name in ctl.RESERVED_NAMES
    with refused(errno.EINVAL):
        ctl.parse_root_ctl(f"new {name} /bin/true\n".encode())
    with refused(errno.EINVAL):
        ctl.parse_agent_ctl(f"name {name}\n".encode())
    if not name.startswith("."):
        assert ctl.check_name(name + "2") == name + "2"  # only the names themselves


def test_root_ctl() -> None:
    agents = ctl.parse_root_ctl(b"new alice /bin/cat\nnew bob\n")
    assert agents == [ctl.NewAgent("alice", ["/bin/cat"]), ctl.NewAgent("bob", None)]
    for bad in (b"new", b"old alice", b"new ctl", b"new a\nnew a"):
        with refused(errno.EINVAL):
            ctl.parse_root_ctl(bad)


def test_inbox_lines() -> None:
    assert parse_lines(b'hello\n{"type":"x","n":1}\n\n') == [
        {"type": "text", "data": "hello"}, {"type": "x", "n": 1}]
    # Only a line that starts with "{" is read as JSON; "[1,2]" is text.
    assert parse_lines(b"[1,2]") == [{"type": "text", "data": "[1,2]"}]
    for bad in (b"{not json\n", b'{"a":1} trailing\n', b"{\n"):
        with refused(errno.EINVAL):
            parse_lines(bad)


def _spill(store: AgentStore, draft: values.Draft) -> None:
    with store.env.begin(write=True) as txn:
        values.spill(txn, store, draft)
    values.spilled(draft)


def _write(store: AgentStore, draft: values.Draft, offset: int, data: bytes) -> None:
    """A write, its chunks put in the store at once when they are past SPILL bytes."""
    with store.read() as txn:
        values.absorb(values.plan_write(txn, store, draft, offset, data))
    if values.should_spill(draft):
        _spill(store, draft)


def _truncate(store: AgentStore, draft: values.Draft, size: int) -> None:
    with store.read() as txn:
        values.absorb(values.plan_truncate(txn, store, draft, size))


def _publish(store: AgentStore, path: str, draft: values.Draft) -> None:
    with store.env.begin(write=True) as txn:
        view = state.TxnState(store, txn, 0)
        view.set(path, state.lookup(view, path).changed(draft.size, draft))
        view.finish()
    values.published(draft)


def _value(store: AgentStore, path: str, draft: values.Draft | None = None) -> bytes:
    with store.read() as txn:
        entry = state.lookup(state.TxnState(store, txn, 0), path)
        size = entry.size if draft is None else draft.size
        return values.read(txn, store, entry.blob, size, draft, 0, 1 << 30)


def test_state_operations(store: AgentStore) -> None:
    with store.env.begin(write=True) as txn:
        view = state.TxnState(store, txn, 0)
        state.mkdir(view, "a")
        state.create(view, "a/x", 1)
        with refused(errno.ENOENT):
            state.create(view, "missing/x", 2)
        with refused(errno.ENOTDIR):
            state.create(view, "a/x/y", 2)
        with refused(errno.EEXIST):
            state.mkdir(view, "a")
        with refused(errno.ENOTEMPTY):
            state.rmdir(view, "a")
        with refused(errno.EISDIR):
            state.file(view, "a")
        state.mkdir(view, "a/sub")
        state.create(view, "a/sub/deep", 2)
        state.rename(view, "a", "b")
        assert view.get("a") is None and view.get("a/sub/deep") is None
        assert state.lookup(view, "b/sub/deep").blob == 2  # moved, its bytes with it
        with refused(errno.EINVAL):
            state.rename(view, "b", "b/sub/inside")
        assert sorted(name for name, _ in view.children("b")) == ["sub", "x"]
        # Another agent's keys are a different tree.
        assert list(state.TxnState(store, txn, 1).children("")) == []


def test_a_draft_is_invisible_until_published(store: AgentStore) -> None:
    """Chunks a draft stages are skipped by readers; publishing replaces only the chunks
    it wrote, and a truncation drops the chunks past it; the rest is read as zeros."""
    chunk = values.CHUNK
    with store.env.begin(write=True) as txn:
        state.create(state.TxnState(store, txn, 0), "v", 7)
    first = values.Draft(100, 7, 0, 0)
    _write(store, first, 0, b"a" * (3 * chunk + 5))
    assert _value(store, "v") == b""
    assert _value(store, "v", first) == b"a" * (3 * chunk + 5)
    _publish(store, "v", first)
    assert _value(store, "v") == b"a" * (3 * chunk + 5)
    second = values.Draft(101, 7, 0, 3 * chunk + 5)
    _write(store, second, chunk - 2, b"XYZW")  # across two chunks, each patched
    _spill(store, second)  # in the store, under the draft's gen: still invisible
    assert _value(store, "v") == b"a" * (3 * chunk + 5)
    _truncate(store, second, 2 * chunk + 1)
    _write(store, second, 2 * chunk + 10, b"!")  # past the end: a hole of zeros
    want = b"a" * (chunk - 2) + b"XYZW" + b"a" * (chunk - 2) + b"a" + b"\0" * 9 + b"!"
    assert _value(store, "v", second) == want
    assert _value(store, "v") == b"a" * (3 * chunk + 5)
    _publish(store, "v", second)
    assert _value(store, "v") == want
    with store.read() as txn:  # one version of each chunk is left, none past the end
        keys = [bytes(k) for k, _ in txn.cursor(db=store.db["chunks"])]
        assert [int.from_bytes(k[8:16], "big") for k in keys] == [0, 1, 2]
        assert list(txn.cursor(db=store.db["drafts"])) == []
    # A draft never published: discarded, or swept as a crash would leave it.
    for gen in (102, 103):
        draft = values.Draft(gen, 7, 0, len(want))
        _write(store, draft, 0, b"lost" * chunk)
        if gen == 102:
            with store.env.begin(write=True) as txn:
                values.discard(txn, store, draft)
    assert values.sweep(store) == 1
    assert _value(store, "v") == want
    with store.read() as txn:
        assert len(list(txn.cursor(db=store.db["chunks"]))) == 3


def test_overlay_is_invisible_until_applied(store: AgentStore) -> None:
    with store.env.begin(write=True) as txn:
        state.create(state.TxnState(store, txn, 0), "kept", 1)
    overlay = TickOverlay(store, 0, values.ValueIds(store))
    state.mkdir(overlay, "dir")
    state.create(overlay, "dir/f", 2)
    state.rename(overlay, "kept", "dir/moved")
    with store.read() as txn:
        committed = state.TxnState(store, txn, 0)
        assert committed.get("kept") is not None and committed.get("dir") is None
    assert sorted(name for name, _ in overlay.children("dir")) == ["f", "moved"]
    assert overlay.get("kept") is None
    with store.env.begin(write=True) as txn:
        view = state.TxnState(store, txn, 0)
        for path, entry in overlay.changes.items():
            view.set(path, entry)
    with store.read() as txn:
        committed = state.TxnState(store, txn, 0)
        assert committed.get("kept") is None
        assert state.lookup(committed, "dir/moved").blob == 1


def test_journal_offsets_are_stable(store: AgentStore) -> None:
    journal = Journal(store, "log")
    with store.env.begin(write=True) as txn:
        for index in (0, 1, 3):
            for n in range(3):
                journal.append(txn, index, {"agent": index, "n": n, "pad": "x" * n})
    with store.read() as txn:
        for index in (0, 1, 2, 3, 4):
            whole = journal.read(txn, index, 0, 1 << 20)
            assert len(whole) == journal.size(txn, index)
            for offset in range(len(whole) + 2):
                for size in (1, 7, 4096):
                    assert journal.read(txn, index, offset, size) == whole[offset:offset + size]


def test_inbox_queue_order_and_consumption(store: AgentStore) -> None:
    inbox = Inbox(store)
    with store.env.begin(write=True) as txn:
        first = inbox.append(txn, 2, {"data": "a"})
        inbox.append(txn, 2, {"data": "b", "id": "mine"})
        inbox.append(txn, 5, {"data": "c"})
    assert first["seq"] == 1 and first["type"] == "text" and first["id"]
    with store.env.begin(write=True) as txn:
        assert list(inbox.agents_with_pending(txn)) == [2, 5]
        seq, message = inbox.first(txn, 2) or (0, {})
        assert (seq, message["data"]) == (1, "a")
        assert inbox.consume(txn, 2, seq)
        seq, message = inbox.first(txn, 2) or (0, {})
        assert (seq, message["id"]) == (2, "mine")
        assert inbox.count(txn, 2) == 1
