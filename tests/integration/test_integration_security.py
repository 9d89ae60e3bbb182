"""Security defaults, checked statically over the package source (``platform/selftune``) so that a
regression fails here: YAML only through ``safe_load``, checkpoints only through
``torch.load(..., weights_only=True)``, no pickle/eval/exec on data, modules imported by name only
from inside the package, and Ray started by the CLI without a dashboard on a public interface."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support import REPO

PACKAGE = REPO / "platform" / "selftune"
SOURCES = sorted(PACKAGE.rglob("*.py"))
PUBLIC_HOSTS = ("0.0.0.0", "::", "[::]")


def parsed() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), filename=str(path))) for path in SOURCES]


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def dotted(node: ast.AST) -> str:
    """``yaml.safe_load`` for an attribute chain, ``eval`` for a name, '' otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def test_sources_found():
    assert len(SOURCES) > 20 and (PACKAGE / "cli.py") in SOURCES


def test_yaml_is_only_read_with_safe_load():
    unsafe = {"yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load",
              "yaml.full_load_all", "yaml.Loader", "yaml.UnsafeLoader", "yaml.FullLoader"}
    found = []
    for path, tree in parsed():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and dotted(node) in unsafe:
                found.append(f"{where(path, node)} {dotted(node)}")
            if isinstance(node, ast.ImportFrom) and node.module == "yaml":
                found += [f"{where(path, node)} from yaml import {alias.name}" for alias in node.names
                          if alias.name in {name.split('.')[1] for name in unsafe}]
    assert not found, "YAML must be read with yaml.safe_load:\n" + "\n".join(found)


def test_every_torch_load_passes_weights_only_true():
    loads, bad = [], []
    for path, tree in parsed():
        for call in calls(tree):
            if dotted(call.func) == "torch.load":
                loads.append(where(path, call))
                value = keyword(call, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    bad.append(where(path, call))
    assert loads, "no torch.load found: has checkpoint loading moved? update this test"
    assert not bad, "torch.load without weights_only=True (unpickles arbitrary code):\n" + "\n".join(bad)


def test_no_eval_exec_or_unrestricted_unpickling():
    forbidden = {"eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "marshal.loads",
                 "torch.jit.load", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads"}
    found = [f"{where(path, call)} {dotted(call.func)}" for path, tree in parsed() for call in calls(tree)
             if dotted(call.func) in forbidden]
    for path, tree in parsed():
        for call in calls(tree):
            if dotted(call.func) in {"np.load", "numpy.load"}:
                value = keyword(call, "allow_pickle")
                if not (isinstance(value, ast.Constant) and value.value is False):
                    found.append(f"{where(path, call)} np.load without allow_pickle=False")
        for node in ast.walk(tree):
            # A pickle.Unpickler subclass must restrict what it resolves.
            if isinstance(node, ast.ClassDef) and any(dotted(base) == "pickle.Unpickler" for base in node.bases):
                if not any(isinstance(item, ast.FunctionDef) and item.name == "find_class" for item in node.body):
                    found.append(f"{where(path, node)} {node.name} subclasses pickle.Unpickler without find_class")
    assert not found, "code or pickles could be run from data:\n" + "\n".join(found)


def test_modules_are_imported_by_name_only_from_inside_the_package():
    """Nothing named in a config is imported: dynamic imports only walk selftune's own sub-packages
    (``f"{__name__}.{...}"``); models and stage kinds are looked up in registries."""
    found = []
    for path, tree in parsed():
        for call in calls(tree):
            if dotted(call.func) in {"importlib.import_module", "import_module"}:
                target = call.args[0] if call.args else None
                package_relative = (
                    isinstance(target, ast.JoinedStr) and target.values
                    and isinstance(target.values[0], ast.FormattedValue)
                    and dotted(target.values[0].value) == "__name__"
                ) or (isinstance(target, ast.Constant) and str(target.value).startswith("selftune."))
                if not package_relative:
                    found.append(where(path, call))
    assert not found, "import_module with a name that does not start inside selftune:\n" + "\n".join(found)


def test_unknown_model_or_stage_kind_is_refused_not_imported():
    from selftune.errors import SelftuneError
    from selftune.models import build_model
    from selftune.config import stage_kind

    with pytest.raises(SelftuneError, match="unknown model"):
        build_model("os.system", num_classes=2)
    with pytest.raises(SelftuneError, match="unknown stage kind 'subprocess.run'; valid kinds are: "):
        stage_kind("subprocess.run")  # a registry lookup, never an import


def _ray_init_keywords(function: ast.AST, call: ast.Call) -> dict[str, ast.AST] | None:
    """The call's keywords, with ``**name`` expanded when ``name`` is a dict literal assigned in the
    same function; None when a ``**`` cannot be resolved."""
    result = {}
    for kw in call.keywords:
        if kw.arg is not None:
            result[kw.arg] = kw.value
            continue
        assigned = [node.value for node in ast.walk(function) if isinstance(node, ast.Assign)
                    and any(isinstance(t, ast.Name) and isinstance(kw.value, ast.Name) and t.id == kw.value.id
                            for t in node.targets)]
        if len(assigned) != 1 or not isinstance(assigned[0], ast.Dict):
            return None
        for key, value in zip(assigned[0].keys, assigned[0].values):
            if not isinstance(key, ast.Constant):
                return None
            result[key.value] = value
    return result


def test_local_ray_starts_without_a_public_dashboard():
    """``ray.init()`` that starts a local instance (no ``address``) must not serve a dashboard, or
    only on loopback; joining an existing cluster (``address=``) is the cluster's business."""
    inits, bad = [], []
    for path, tree in parsed():
        functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for function in functions:
            for call in calls(function):
                if dotted(call.func) != "ray.init":
                    continue
                inits.append(where(path, call))
                keywords = _ray_init_keywords(function, call)
                if keywords is None:
                    bad.append(f"{where(path, call)} ray.init(**...) that this test cannot resolve")
                    continue
                if "address" in keywords:
                    continue
                dashboard = keywords.get("include_dashboard")
                host = keywords.get("dashboard_host")
                off = isinstance(dashboard, ast.Constant) and dashboard.value is False
                loopback = isinstance(host, ast.Constant) and host.value in ("127.0.0.1", "localhost")
                if not (off or loopback):
                    bad.append(f"{where(path, call)} local ray.init without include_dashboard=False or a loopback dashboard_host")
    assert inits, "no ray.init found: has cluster start-up moved? update this test"
    assert not bad, "\n".join(bad)


def test_no_service_binds_a_public_interface():
    found = []
    for path, tree in parsed():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in PUBLIC_HOSTS:
                found.append(f"{where(path, node)} {node.value!r}")
    assert not found, "services started by the CLI must bind 127.0.0.1 unless told otherwise:\n" + "\n".join(found)
