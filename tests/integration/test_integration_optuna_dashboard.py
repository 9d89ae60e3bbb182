"""Optuna's dashboard on a search's study: the command a search ends with serves ``optuna.db``,
and headless Chromium shows the trials (COMPLETE and PRUNED) with their per-stage objective values.

The study is written by selftune's own searcher (``driver.make_searcher`` on the quickstart space),
driven the way Tune drives it: ``suggest``, one ``on_trial_result`` per stage, ``on_trial_complete``
(a trial stopped before its last stage is told PRUNED). No Ray cluster and no training: seconds.
The screenshot goes to the test's folder, and with ``SELFTUNE_UPDATE_SCREENSHOT=1`` replaces
``docs/optuna-dashboard.png``. Needs ``optuna-dashboard`` (the ``dashboard`` extra); the browser
test also needs the Debian packages ``chromium`` and ``chromium-driver`` and ``selenium``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from servers import free_port, headless_chromium, require_browser, stop_process_group
from support import REPO

pytestmark = pytest.mark.slow  # ~25 s: a web server and a browser, though no Ray workers

# Per trial, the objective after each stage (supervised, pseudo_label, self_train); a shorter
# curve is a trial ASHA stopped early. Trial 2 is the best.
CURVES = [[0.612, 0.612, 0.684], [0.583, 0.583], [0.634, 0.634, 0.712], [0.551], [0.621, 0.621, 0.668], [0.574]]
STAGES = 3
BEST = 2


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A search folder whose ``optuna.db`` holds six trials of the quickstart space, as a search leaves it."""
    import optuna

    from selftune.search.driver import make_searcher
    from selftune.search.space import load_search_space
    from selftune.search.trial import OBJECTIVE, STAGE

    folder = tmp_path_factory.mktemp("search-quickstart")
    space = load_search_space(REPO / "search_spaces" / "quickstart.yaml")
    searcher = make_searcher(space, folder)
    for number, curve in enumerate(CURVES):
        trial_id = f"trial_{number}"
        searcher.suggest(trial_id)
        result = {}
        for stage, value in enumerate(curve, start=1):
            result = {OBJECTIVE: value, STAGE: stage, "stages_total": STAGES, "training_iteration": stage}
            searcher.on_trial_result(trial_id, result)
        searcher.on_trial_complete(trial_id, result)
    trials = optuna.load_study(study_name=space.name, storage=f"sqlite:///{folder / 'optuna.db'}").trials
    # The study holds what the dashboard must show: per-stage values, PRUNED for the stopped trials.
    assert [t.state.name for t in trials] == ["COMPLETE" if len(c) == STAGES else "PRUNED" for c in CURVES]
    assert [list(t.intermediate_values.values()) for t in trials] == CURVES
    return {"folder": folder, "name": space.name, "trials": trials}


@pytest.fixture(scope="module")
def dashboard(study, tmp_path_factory):
    """``optuna-dashboard`` started with the very command the search prints (plus a free port)."""
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard not installed (pip install -e '.[dashboard]')")
    from selftune.search.dashboard import dashboard_command

    port = free_port()
    home = tmp_path_factory.mktemp("dashboard-home")  # gunicorn keeps a control socket in ~/.gunicorn
    log = home / "optuna-dashboard.log"
    env = {**os.environ, "HOME": str(home)}
    with open(log, "wb") as output:
        # Own session: gunicorn forks a worker; the whole group is stopped at the end.
        process = subprocess.Popen(shlex.split(dashboard_command(study["folder"], port=port)), stdout=output,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        studies = _wait_for_studies(url, process, log)
        yield {"url": url, "studies": studies}
    finally:
        stop_process_group(process)


def _wait_for_studies(url: str, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"optuna-dashboard exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(f"{url}/api/studies", timeout=2) as response:
                return json.load(response)["study_summaries"]
        time.sleep(0.25)
    raise RuntimeError(f"optuna-dashboard at {url} did not answer in {timeout:.0f} s:\n{log.read_text(errors='replace')}")


def test_the_printed_command_serves_the_searchs_study(dashboard, study):
    (summary,) = dashboard["studies"]
    assert summary["study_name"] == study["name"] and summary["directions"] == ["maximize"]


def test_dashboard_shows_the_trials_with_their_per_stage_values(dashboard, study, tmp_path):
    require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    (summary,) = dashboard["studies"]
    study_page = f"{dashboard['url']}/dashboard/studies/{summary['study_id']}"
    with headless_chromium(1600, 1000) as driver:
        wait = WebDriverWait(driver, 60)
        body = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731

        # The study page: a line per trial in the intermediate-values chart, and the best trial.
        driver.get(study_page)
        legend = [f"trial #{number}" for number in range(len(CURVES))]
        wait.until(lambda _: "Intermediate values" in body() and all(entry in body() for entry in legend))
        assert f"Best Trial (number={BEST})" in body()
        assert f"{CURVES[BEST][-1]}" in body()

        # The trials page: each trial's state, value and one intermediate value per stage it ran.
        driver.get(f"{study_page}/trials")
        wait.until(lambda _: f"{len(CURVES)} Trials" in body())
        for number, curve in enumerate(CURVES):
            driver.find_element(By.XPATH, f"//*[normalize-space(text())='Trial {number}']").click()
            heading = f"Trial {number} (trial_id="
            wait.until(lambda _: heading in body())
            detail = _trial_detail(body(), heading)
            state = "Complete" if len(curve) == STAGES else "Pruned"
            assert state in detail.split("\n")[:3], detail
            steps = [f"{stage} {value}" for stage, value in enumerate(curve, start=1)]
            assert _section(detail, "Intermediate Values", "Parameter") == steps, detail
            for name in study["trials"][number].params:
                assert name in detail, f"parameter {name} not shown:\n{detail}"

        # The picture for the README: the best trial beside the list of trials.
        driver.find_element(By.XPATH, f"//*[normalize-space(text())='Trial {BEST}']").click()
        wait.until(lambda _: f"Trial {BEST} (trial_id=" in body())
        time.sleep(1)  # let the page settle
        screenshot = tmp_path / "optuna-dashboard.png"
        driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
        if os.environ.get("SELFTUNE_UPDATE_SCREENSHOT") == "1":
            (REPO / "docs").mkdir(exist_ok=True)
            shutil.copyfile(screenshot, REPO / "docs" / "optuna-dashboard.png")


def _trial_detail(text: str, heading: str) -> str:
    """The trial detail pane's text: from its heading on (the list of trials comes before it)."""
    return text[text.index(heading):]


def _section(detail: str, start: str, end: str) -> list[str]:
    """The lines between two labels of the detail pane (e.g. the intermediate values, one per step)."""
    lines = detail.split("\n")
    return lines[lines.index(start) + 1:lines.index(end)]
