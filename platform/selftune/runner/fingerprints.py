"""What a stage key adds to a stage's config so that a stored stage is never reused stale.

* The **code fingerprint** of a stage kind: selftune's version, the source of the code every
  stage runs (``engine``, ``models``, ``data``, ``metrics``, ``schedules``) and the source of the
  kind's own module with the ``stages`` and ``methods`` modules it imports, followed import by
  import. A changed line in ``methods/common.py`` changes the kinds that import it (self-training)
  and not the others (supervised). Computed once per process and kind: it reads ~60 small files.
* The **data fingerprint** of a pipeline's data: the dataset's layout, classes and samples (every
  image's and mask's name, size and mtime: ``stat`` only, no pixels read) and the resolved
  labelled / unlabelled / selection split, which is what the split files' content decides.
  Computed once per run (``run_stages``), so a mask touched between runs is seen by the next one.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import selftune
from selftune.config import DataConfig, PipelineConfig, stage_kind

PACKAGE = Path(selftune.__file__).resolve().parent
SHARED_CODE = ("engine", "models", "data", "metrics", "schedules.py")  # every stage runs these
FOLLOWED = ("selftune.stages", "selftune.methods")  # imports followed module by module


@dataclass(frozen=True)
class Fingerprints:
    """The code fingerprint of each kind the pipeline runs, and its data's fingerprint."""

    code: dict[str, str]
    data: str


def pipeline_fingerprints(pipeline: PipelineConfig) -> Fingerprints:
    kinds = sorted({stage.kind for stage in pipeline.stages})
    return Fingerprints({kind: code_fingerprint(kind) for kind in kinds}, data_fingerprint(pipeline.data, pipeline.seed))


@functools.lru_cache(maxsize=None)
def code_fingerprint(kind: str) -> str:
    """Version + the source of the shared code and of the kind's own module closure."""
    module = stage_kind(kind).run.__module__
    files = sorted(shared_files() | module_closure(module))
    digest = hashlib.sha256(selftune.__version__.encode())
    for path in files:
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + read_source(path) + b"\0")
    return digest.hexdigest()[:16]


def read_source(path: Path) -> bytes:
    return path.read_bytes()


def forget_code_fingerprints() -> None:
    """Compute the code fingerprints again on next use (after a source file changed in this process)."""
    code_fingerprint.cache_clear()
    imported_modules.cache_clear()


def shared_files() -> set[Path]:
    found: set[Path] = set()
    for name in SHARED_CODE:
        path = PACKAGE / name
        found |= set(path.rglob("*.py")) if path.is_dir() else {path}
    return found


def module_file(name: str) -> Path | None:
    """The source file of module ``selftune.x.y`` (a package's ``__init__.py``), if it exists."""
    relative = Path(*name.split(".")[1:])
    for path in (PACKAGE / relative.with_suffix(".py"), PACKAGE / relative / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_closure(name: str) -> set[Path]:
    """``name``'s file and those of the ``stages`` / ``methods`` modules it imports, transitively.
    A package's ``__init__`` is not followed wholesale (``selftune.methods`` imports every
    method): a name imported from it is followed to the module the ``__init__`` takes it from."""
    seen: set[Path] = set()
    pending = [name]
    while pending:
        path = module_file(pending.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        pending += imported_modules(path)
    return seen


@functools.lru_cache(maxsize=None)
def imported_modules(path: Path) -> list[str]:
    modules: list[str] = []
    for node in ast.walk(ast.parse(read_source(path))):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names if alias.name.startswith(FOLLOWED)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(FOLLOWED):
            modules += [source_of(node.module, alias.name) for alias in node.names]
    return modules


def source_of(package: str, name: str) -> str:
    """The module that ``from package import name`` takes ``name`` from: a submodule, the module
    the package's ``__init__`` re-exports it from, or the package itself."""
    if module_file(f"{package}.{name}") is not None:
        return f"{package}.{name}"
    init = module_file(package)
    if init is not None and init.name == "__init__.py":
        for node in ast.walk(ast.parse(read_source(init))):
            if isinstance(node, ast.ImportFrom) and node.module and any(a.name == name for a in node.names):
                return node.module
    return package


def data_fingerprint(config: DataConfig, seed: int) -> str:
    """The dataset as opened and split: layout, root, classes, samples' files (name, size, mtime)
    and the split's ids. Opening it is what every run does first anyway (``check_data``)."""
    from selftune.stages.data import prepare_data

    data = prepare_data(config, seed)
    index = data.index
    identity = {
        "layout": index.name, "root": str(Path(index.root).resolve()), "classes": index.classes,
        "label_map": index.label_map.tolist() if index.label_map is not None else None,
        "train": [_sample_files(sample, index.root) for sample in index.train],
        "val": [_sample_files(sample, index.root) for sample in index.val],
        "split": {part: [sample.id for sample in getattr(data, part)]
                  for part in ("labelled", "unlabelled", "selection", "reported")},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _sample_files(sample, root: Path) -> list:
    return [sample.id, *(_file_stat(path, root) for path in (sample.image, sample.mask))]


def _file_stat(path: Path | None, root: Path) -> list | None:
    if path is None:
        return None
    stat = os.stat(path)
    try:
        name = str(Path(path).relative_to(root))
    except ValueError:
        name = str(path)
    return [name, stat.st_size, stat.st_mtime_ns]
