"""Opening a tracking store safely before any run is created.

SQLite: several processes opening one fresh ``sqlite:///`` file race to create MLflow's schema
(``table experiments already exists``, alembic's "Online migration expected to match one row"):
MLflow creates and upgrades tables without a lock. ``prepare_store`` does it once, under an
``flock`` on ``<db>.lock``, and opens the store there (which also inserts MLflow's default
experiment, the other racy write). A fresh file is a copy of a schema-only database built once per
MLflow version in the cache folder: MLflow's ~50 migrations take seconds, a copy milliseconds.

Other databases (PostgreSQL, MySQL): a missing driver or a server that does not answer is one line
naming the URI, within seconds, instead of MLflow's minutes of retries and a long traceback.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selftune.errors import ConfigError, SelftuneError

_log = logging.getLogger(__name__)
_CONNECT_TIMEOUT_S = 5
_prepared: set[str] = set()  # URIs this process has prepared (the work is needed once per process)

# The pip package that provides a DBAPI module SQLAlchemy failed to import.
_DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pymysql": "PyMySQL", "MySQLdb": "mysqlclient",
    "pymssql": "pymssql", "pyodbc": "pyodbc",
}


class StoreUnreachable(SelftuneError):
    """The tracking database does not answer when a run or search starts (exit code 2)."""


def prepare_store(tracking_uri: str) -> None:
    """Make the store at ``tracking_uri`` ready for concurrent use (see the module docstring)."""
    if tracking_uri in _prepared or tracking_uri.startswith(("http://", "https://", "databricks")):
        return
    from sqlalchemy.engine import make_url

    url = make_url(tracking_uri)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            _prepare_sqlite(tracking_uri, Path(url.database))
    else:
        _check_database(tracking_uri, url)
    _prepared.add(tracking_uri)


# ---------------------------------------------------------------------------------------------- sqlite


def _prepare_sqlite(tracking_uri: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock")):
        if not path.exists() or path.stat().st_size == 0:
            _copy_schema(path)
        _open(tracking_uri)  # creates or upgrades what the copy did not, and the default experiment


def _open(tracking_uri: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _copy_schema(path: Path) -> None:
    """Copy the schema-only template into the fresh ``path``; without a template MLflow creates
    the schema itself (slowly, but still under the caller's lock)."""
    template = _schema_template()
    if template is None:
        return
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    shutil.copyfile(template, partial)
    os.replace(partial, path)


def _schema_template() -> Path | None:
    """``<cache>/mlflow-schema/<mlflow version>.db``: MLflow's tables at its latest revision and no
    rows (the default experiment's artifact location depends on where a store lives)."""
    import mlflow

    template = _cache_dir() / "mlflow-schema" / f"mlflow-{mlflow.__version__}.db"
    if template.is_file():
        return template
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        with _locked(template.with_suffix(".lock")):
            if not template.is_file():
                _build_template(template)
        return template
    except Exception as error:  # noqa: BLE001  (private MLflow helpers moved, read-only cache: MLflow does it)
        _log.debug("no MLflow schema template (%s: %s); MLflow creates the schema", type(error).__name__, error)
        return None


def _build_template(template: Path) -> None:
    # MLflow's own creation path (create_all + alembic upgrade), minus the store's default experiment.
    from mlflow.store.db.utils import _initialize_tables, _verify_schema, create_sqlalchemy_engine

    partial = template.with_name(f"{template.name}.{os.getpid()}.partial")
    engine = create_sqlalchemy_engine(f"sqlite:///{partial}")
    try:
        _initialize_tables(engine)
        _verify_schema(engine)
    finally:
        engine.dispose()
    os.replace(partial, template)


def _cache_dir() -> Path:
    # The same rule as selftune.data.synthetic.default_cache_dir (not imported: it pulls numpy).
    return Path(os.environ.get("SELFTUNE_CACHE") or Path.home() / ".cache" / "selftune").expanduser()


# ---------------------------------------------------------------------------------------------- servers


def _check_database(tracking_uri: str, url) -> None:
    """One connection with a short timeout: a missing driver or a silent server is one line."""
    import sqlalchemy

    shown = url.render_as_string(hide_password=True)
    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": _CONNECT_TIMEOUT_S},
                                          poolclass=sqlalchemy.pool.NullPool)
    except ModuleNotFoundError as error:
        raise ConfigError(_missing_driver(shown, url, error.name or "")) from None
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as error:
        raise ConfigError(f"tracking URI {shown}: {str(error).splitlines()[0]}") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()
        raise StoreUnreachable(
            f"MLflow tracking database {shown} is unreachable ({reason[0] if reason else type(error).__name__}); "
            "start it, or pass --tracking-uri / set MLFLOW_TRACKING_URI to one that answers") from None
    finally:
        engine.dispose()


def _missing_driver(shown: str, url, module: str) -> str:
    package = _DRIVER_PACKAGES.get(module.split(".")[0], module)
    message = f"tracking URI {shown}: its database driver {module!r} is not installed; pip install {package}"
    if url.get_backend_name() == "postgresql" and module == "psycopg":
        psycopg2 = url.set(drivername="postgresql+psycopg2").render_as_string(hide_password=True)
        installed = "psycopg2 is installed" if _importable("psycopg2") else "or pip install psycopg2-binary"
        message += f" ({installed}: write {psycopg2})"
    return message


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
