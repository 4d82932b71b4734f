"""The lifecycle of an agent: its states, their transitions, and the trigger each one owes.

    creating --create ok--> active <--> dormant      any --terminate--> terminated
    creating --create fails--> failed <--recover-- ; active --N failures--> failed

A transition happens at once, in the transaction that causes it; the program hears of
it afterwards, once, through a lifecycle trigger (`record.hook`) that the tick engine runs
before any queued message.  Only `create` and `wake` are work the agent must get right:
a failing `create` leaves it failed, a failing `wake` is retried like any tick.  The
others tell the program what already happened, so their failures are logged and that is
all.  An agent without a program has nobody to tell: its hooks other than `create` are
dropped, and it stays `creating` until it has a program to run `create`.
"""

from __future__ import annotations

from .inbox import Message
from .store import AgentRecord

DEFAULT_IDLE = 30.0  # seconds an active agent with nothing to do stays awake
HOOKS = ("create", "wake", "sleep", "terminate", "error")
# Hooks whose failure changes nothing: the transition they report has happened.
REPORTS = ("sleep", "terminate", "error")


def create(record: AgentRecord) -> None:
    record.status = "creating"
    record.hook = "create"


def wake(record: AgentRecord) -> bool:
    """A trigger reached a dormant agent; True if it changed anything."""
    if record.status != "dormant":
        return False
    record.status = "active"
    # Woken before it was told it slept: it never noticeably slept, so tell it neither.
    record.hook = None if record.hook == "sleep" else "wake"
    return True


def sleep(record: AgentRecord) -> None:
    if record.status == "active":
        record.status = "dormant"
        # Put back to sleep before it was told it woke: it hears of neither.
        record.hook = None if record.hook == "wake" else record.hook or "sleep"


def terminate(record: AgentRecord) -> None:
    if record.status != "terminated":
        record.status = "terminated"
        record.hook = "terminate"


def fail(record: AgentRecord, why: str) -> None:
    # A create or wake that failed is owed again after `recover`.
    record.failed_hook = record.hook if record.hook in ("create", "wake") else None
    record.status = "failed"
    record.hook = "error"
    record.hook_error = why


def recover(record: AgentRecord, has_work: bool) -> None:
    if record.status == "failed":
        record.failures = 0
        record.hook_error = None
        record.hook, record.failed_hook = record.failed_hook, None
        if record.hook == "create":
            record.status = "creating"
        else:
            record.status = "active" if has_work or record.hook else "dormant"


def trigger(record: AgentRecord) -> Message:
    """The trigger a program gets for the agent's pending lifecycle hook."""
    assert record.hook is not None
    message: Message = {"type": record.hook, "lifecycle": True, "status": record.status}
    if record.hook == "error":
        message["error"] = record.hook_error or ""
        message["failures"] = record.failures
    return message


def finished(record: AgentRecord, hook: str) -> None:
    """The program ran `hook` (committed, or failed where failing changes nothing)."""
    if hook == "create" and record.status == "creating":
        record.status = "active"
    if record.hook == hook:
        record.hook = None  # hook_error stays: ctl status says why the agent failed
    elif hook == "sleep" and record.hook is None and record.status == "active":
        # Woken while it ran: `wake` drops a pending `sleep` as if it never ran, but this one
        # did, so the program is owed a `wake` after all.
        record.hook = "wake"
    elif hook == "wake" and record.hook is None and record.status == "dormant":
        # Put to sleep while it ran: likewise, it is owed a `sleep`.
        record.hook = "sleep"


def runs_program(record: AgentRecord, hook: str) -> bool:
    """Whether `hook` runs the agent's program, as its `hooks` setting says."""
    return record.hooks is None or hook in record.hooks


def shown_hooks(record: AgentRecord) -> str:
    if record.hooks is None:
        return "all"
    return " ".join(record.hooks) or "none"


def drop_without_program(record: AgentRecord) -> bool:
    """An agent without a program drops the hooks it cannot run; True if one was dropped."""
    if record.hook is None or record.hook == "create":
        return False
    record.hook = None
    return True
