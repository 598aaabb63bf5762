"""User-facing errors.

Every problem a user can cause (bad file, unknown name, wrong shapes) raises `EdgefuseError` with a
one-line message that names the file and the problem. The CLI prints that line and exits non-zero;
library users can catch it.
"""

from __future__ import annotations


class EdgefuseError(Exception):
    """A problem with user input, reported as one clear line."""

    exit_code = 2

    def __init__(self, message: str, *, path: object | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)


class WriteError(EdgefuseError):
    """A write failed for a reason of the machine, not of the input (a full disk, a read-only directory).

    Kept apart so that code which turns an input's problem into a verdict (an edge's package rejected)
    does not mistake the cloud's own full disk for a fault of that input.
    """

    def __init__(self, reason: str, *, path: object):
        super().__init__(f"cannot write ({reason})", path=path)
        self.reason = reason
