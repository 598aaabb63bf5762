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
