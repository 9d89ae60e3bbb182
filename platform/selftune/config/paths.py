"""Dotted keys into plain YAML data: ``stages.supervised.optimizer.lr``.

Lists of named mappings (stages) are addressed by name, or by position.
"""

from __future__ import annotations

from typing import Any

from selftune.errors import ConfigError


def set_dotted(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set ``raw[a][b]... = value`` for ``key = "a.b..."``, creating mappings on the way."""
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        child = _child(node, part, parts[: depth + 1], source, create=True)
        node = child
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key, source)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{source}: {key}: {'.'.join(parts[:-1])} is a value, not a mapping")


def get_dotted(raw: dict[str, Any], key: str, source: str) -> Any:
    """Read ``raw`` at a dotted key; a missing key is a ConfigError naming it."""
    node: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        node = _child(node, part, parts[: depth + 1], source, create=False)
    return node


def _child(node: Any, part: str, path: list[str], source: str, *, create: bool) -> Any:
    key = ".".join(path)
    if isinstance(node, list):
        return node[_list_index(node, part, key, source)]
    if not isinstance(node, dict):
        raise ConfigError(f"{source}: {key}: {'.'.join(path[:-1])} is a value, not a mapping")
    if part not in node:
        if not create:
            raise ConfigError(f"{source}: {key}: no such key")
        node[part] = {}
    elif node[part] is None and create:
        node[part] = {}
    return node[part]


def _list_index(items: list[Any], part: str, key: str, source: str) -> int:
    """Stages (and other lists of named mappings) are addressed by name or by position."""
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if part in names:
        return names.index(part)
    if part.lstrip("-").isdigit() and -len(items) <= int(part) < len(items):
        return int(part)
    known = ", ".join(str(name) for name in names if name is not None)
    raise ConfigError(f"{source}: {key}: no item named {part!r}; names are: {known or '(none)'}")


def deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [deep_copy(item) for item in value]
    return value
