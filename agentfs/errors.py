"""Every refusal agentfs makes, named once: an errno and a sentence for the agent's log."""

from __future__ import annotations

import errno


class FsError(Exception):
    """An operation refused: `errno` goes back to the caller, `message` into the agent's log."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class Repeated(FsError):
    """A refusal said again (at close, of a write refused before): not logged twice."""


def no_such_file(what: str) -> FsError:
    return FsError(errno.ENOENT, f"{what}: no such file or directory")


def not_held(why: str) -> FsError:
    """ENOENT for a thing that is not there, said in a sentence of its own."""
    return FsError(errno.ENOENT, why)


def exists(what: str) -> FsError:
    return FsError(errno.EEXIST, f"{what}: already exists")


def not_dir(what: str) -> FsError:
    return FsError(errno.ENOTDIR, f"{what}: not a directory")


def is_dir(what: str) -> FsError:
    return FsError(errno.EISDIR, f"{what}: is a directory")


def not_empty(what: str) -> FsError:
    return FsError(errno.ENOTEMPTY, f"{what}: directory not empty")


def invalid(why: str) -> FsError:
    return FsError(errno.EINVAL, why)


def denied(why: str) -> FsError:
    return FsError(errno.EACCES, why)


def over_quota(why: str) -> FsError:
    return FsError(errno.EDQUOT, why)


def too_long(why: str) -> FsError:
    return FsError(errno.EMSGSIZE, why)


def no_space(why: str) -> FsError:
    return FsError(errno.ENOSPC, why)


def name_too_long(what: str) -> FsError:
    return FsError(errno.ENAMETOOLONG, f"{what}: name too long")


def busy(why: str) -> FsError:
    return FsError(errno.EBUSY, why)
