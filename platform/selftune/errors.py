"""The exceptions selftune raises for bad input.

Every one carries a message meant to be printed on one line as it is: it names the file, the
dotted key or the value at fault and what would be valid. The CLI turns them into exit code 2.
"""

from __future__ import annotations


class SelftuneError(Exception):
    """Base class: a problem with the user's input, not a bug in selftune."""


class ConfigError(SelftuneError):
    """A pipeline or search-space file is malformed, or a value in it is out of range."""


class DataError(SelftuneError):
    """A dataset on disk is missing, unreadable or holds values that are not allowed."""
