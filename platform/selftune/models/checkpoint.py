"""Checkpoints that rebuild their own model: ``model.pt`` (state dict) + ``model.json`` (model config).

``model.json`` holds ``{"name": ..., "num_classes": ..., "options": {...}}`` — the arguments of
``build_model`` — plus any ``extra`` facts (epoch, val mIoU, …), so the next stage needs the
checkpoint folder and nothing else.

Both files are written to a temporary name and renamed into place, ``model.pt`` first: a reader
never sees a half-written file, and a ``model.json`` always describes a complete ``model.pt``.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import torch
from torch import nn

from selftune.errors import ConfigError, DataError
from selftune.models.network import SegmentationNetwork, bare_network
from selftune.models.registry import build_model

__all__ = ["MODEL_CONFIG_FILE", "STATE_DICT_FILE", "load_checkpoint", "save_checkpoint"]

STATE_DICT_FILE = "model.pt"
MODEL_CONFIG_FILE = "model.json"
MODEL_KEYS = ("name", "num_classes", "options")
# Options that only say where the *initial* weights came from. The checkpoint's state dict replaces
# them, so rebuilding must not fetch them again (it may be offline, or lack torchvision).
INITIALISATION_OPTIONS = ("pretrained",)


def _write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    # A unique name per writer (not mkstemp, whose 0600 mode would survive the rename).
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)  # atomic on POSIX within one file system
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _model_record(model_config: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    missing = [key for key in ("name", "num_classes") if key not in model_config]
    if missing:
        raise ConfigError(f"model_config lacks {', '.join(missing)}; it needs name, num_classes and options")
    record = {
        "name": model_config["name"],
        "num_classes": int(model_config["num_classes"]),
        "options": dict(model_config.get("options") or {}),
    }
    clashes = sorted(set(extra or {}) & set(MODEL_KEYS))
    if clashes:
        raise ValueError(f"extra keys {clashes} would overwrite the model config; rename them")
    record.update(extra or {})
    return record


def save_checkpoint(
    directory: Path, model: nn.Module, model_config: dict[str, Any], *, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``directory/model.pt`` and ``directory/model.json``; return ``directory``.

    ``model_config``: ``name``, ``num_classes``, ``options`` as given to ``build_model``. Other keys
    are ignored, so the dict that ``load_checkpoint`` returns (which includes the old ``extra``) can
    be passed back when a fine-tuned model is saved. ``extra`` must be JSON-serialisable.
    A DDP / DataParallel / compiled wrapper is unwrapped so keys never start with ``module.``.
    """
    directory = Path(directory)
    record = _model_record(model_config, extra)
    text = json.dumps(record, indent=2, sort_keys=True)  # fails here, before any file is touched
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in bare_network(model).state_dict().items()}
    _write_atomically(directory / STATE_DICT_FILE, lambda file: torch.save(state, file))
    _write_atomically(directory / MODEL_CONFIG_FILE, lambda file: file.write(text.encode("utf-8")))
    return directory


def _read_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"checkpoint config {path} does not exist; expected a folder written by save_checkpoint")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"checkpoint config {path} is unreadable: {error}") from error
    if not isinstance(record, dict) or not isinstance(record.get("name"), str) or "num_classes" not in record:
        raise DataError(f"checkpoint config {path} lacks 'name' and 'num_classes'; it is not a selftune checkpoint")
    if not isinstance(record.get("options", {}), dict):
        raise DataError(f"checkpoint config {path}: 'options' must be a mapping, got {record['options']!r}")
    return record


def _first_sentence(error: Exception) -> str:
    """torch.load's messages run to paragraphs (and suggest weights_only=False); one sentence suffices."""
    lines = str(error).strip().splitlines()
    return lines[0].split(". ")[0] if lines else ""


def _read_state_dict(path: Path, map_location: str | torch.device) -> Any:
    if not path.is_file():
        raise DataError(f"checkpoint weights {path} do not exist; expected a folder written by save_checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated file, not a torch file, unpickling refused …
        reason = f"{type(error).__name__}: {_first_sentence(error)}"
        raise DataError(f"checkpoint weights {path} are unreadable: {reason}") from error


def _check_keys(state: Any, model: nn.Module, path: Path, name: str) -> None:
    """One-line DataError naming the first missing / unexpected keys (torch's own message lists all)."""
    if not isinstance(state, Mapping):
        raise DataError(f"checkpoint weights {path} do not hold a state dict, got {type(state).__name__}")
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    problems = [
        f"{label} {len(keys)} keys ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})"
        for label, keys in (("missing", missing), ("unexpected", unexpected))
        if keys
    ]
    if problems:
        raise DataError(f"checkpoint weights {path} do not fit model {name!r}: {'; '.join(problems)}")


def load_checkpoint(
    directory: Path, *, map_location: str | torch.device = "cpu"
) -> tuple[SegmentationNetwork, dict[str, Any]]:
    """Rebuild the model from ``directory/model.json``, load ``model.pt`` strictly, move it to ``map_location``.

    Returns ``(model, record)`` where ``record`` is the content of ``model.json`` (model config plus
    the ``extra`` it was saved with). Initialisation-only options (``pretrained``) are not re-applied.
    A missing, corrupt or mismatching checkpoint raises DataError naming the file.
    """
    directory = Path(directory)
    record = _read_record(directory / MODEL_CONFIG_FILE)
    weights = directory / STATE_DICT_FILE
    state = _read_state_dict(weights, map_location)
    options = {k: v for k, v in record.get("options", {}).items() if k not in INITIALISATION_OPTIONS}
    try:
        model = build_model(record["name"], int(record["num_classes"]), **options)
    except (ConfigError, TypeError, ValueError) as error:  # unknown name, options no longer valid
        raise DataError(f"checkpoint config {directory / MODEL_CONFIG_FILE} cannot be rebuilt: {error}") from error
    _check_keys(state, model, weights, record["name"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # same keys, different shapes
        detail = " ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise DataError(f"checkpoint weights {weights} do not fit model {record['name']!r}: {detail}") from error
    return model.to(map_location), record
