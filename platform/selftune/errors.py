"""The exceptions selftune raises for bad input.

Every one carries a message meant to be printed on one line as it is: it names the file, the
dotted key or the value at fault and what would be valid. The CLI turns them into exit code 2.
"""

from __future__ import annotations

import re

_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # Ray's terminal colour codes


class SelftuneError(Exception):
    """Base class: a problem with the user's input, not a bug in selftune."""


class ConfigError(SelftuneError):
    """A pipeline or search-space file is malformed, or a value in it is out of range."""


class DataError(SelftuneError):
    """A dataset on disk is missing, unreadable or holds values that are not allowed."""


def failure_reason(error: BaseException | None) -> str:
    """The one line a person needs from an error: the innermost cause (Ray wraps an error once per
    process it crossed), its first line, without Ray's colour codes."""
    while error is not None and getattr(error, "cause", None) not in (None, error):
        error = error.cause
    if error is None:
        return "unknown error"
    text = _COLOUR.sub("", str(error)).strip()
    first = text.splitlines()[0].strip() if text else ""
    if isinstance(error, SelftuneError) and first:
        return first  # selftune's own messages say what happened and what to change
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
