"""The line a search ends with, to open its Optuna study in ``optuna-dashboard``."""

from __future__ import annotations

import shlex

from selftune.search import dashboard
from selftune.search.dashboard import dashboard_command, dashboard_line, study_url


def test_command_names_the_study_file_absolutely_and_binds_loopback(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "search-quickstart-20261201-120000"
    monkeypatch.chdir(tmp_path)
    relative = "runs/search-quickstart-20261201-120000"
    expected = f"optuna-dashboard sqlite:///{folder}/optuna.db --host 127.0.0.1"
    assert dashboard_command(relative) == expected == dashboard_command(folder)
    assert study_url(relative) == f"sqlite:///{folder}/optuna.db"  # four slashes: an absolute path


def test_command_with_a_port_and_a_folder_with_spaces_is_one_shell_word_per_argument(tmp_path):
    folder = tmp_path / "my searches" / "search-x"
    words = shlex.split(dashboard_command(folder, port=8081))
    assert words == ["optuna-dashboard", f"sqlite:///{folder}/optuna.db", "--host", "127.0.0.1", "--port", "8081"]


def test_line_says_how_to_install_the_dashboard_only_when_it_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(dashboard.importlib.util, "find_spec", lambda name: object())  # installed
    installed = dashboard_line(tmp_path)
    assert installed == f"Optuna's dashboard for this study: {dashboard_command(tmp_path)}"
    monkeypatch.setattr(dashboard.importlib.util, "find_spec", lambda name: None)  # not installed
    missing = dashboard_line(tmp_path)
    assert missing.startswith(installed) and "pip install optuna-dashboard" in missing
