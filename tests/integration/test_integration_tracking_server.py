"""``selftune search`` against a real tracking server (``mlflow server`` on PostgreSQL), over HTTP only,
as Ray workers on other nodes log in the cluster; the MLflow UI checked in headless Chromium; and a
second search whose server goes away mid-search.

One server and one tiny search (2 trials × 3 stages) serve every test here (module fixtures):
- the three-level run tree, params, metrics and artifacts, read back through the server;
- the MLflow UI lists the trial runs with their params and ``val/miou``; the screenshot goes to
  the test's folder, and with ``SELFTUNE_UPDATE_SCREENSHOT=1`` replaces ``docs/mlflow-ui.png``
  (needs the Debian packages ``chromium`` and ``chromium-driver`` and ``selenium``; skipped without);
- the server becoming unreachable (a proxy in front of it is closed) after the first stage: the
  search still ends with every trial in Tune's results and says what was not logged.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from servers import TcpProxy, headless_chromium, require_browser, start_mlflow_server, start_postgres
from support import REPO

pytestmark = pytest.mark.slow

TINY = {
    "stages.supervised.epochs": 1, "stages.supervised.steps_per_epoch": 3,
    "stages.self_train.epochs": 1, "stages.self_train.steps_per_epoch": 3,
    "stages.pseudo_label.threshold": 0.5,
}
PARAMS = ["stages.supervised.optimizer.lr", "stages.pseudo_label.threshold", "stages.self_train.optimizer.lr"]
# Two fixed points (Optuna's points_to_evaluate): two different trials, short values the UI shows whole.
POINTS = [dict(zip(PARAMS, [0.002, 0.4, 0.002])), dict(zip(PARAMS, [0.005, 0.5, 0.004]))]
STAGES = ["supervised", "pseudo_label", "self_train"]


def write_space(folder: Path, name: str, data_root: Path) -> Path:
    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": name,
        "pipeline": str(REPO / "pipelines" / "quickstart.yaml"),
        "set": {**TINY, "data.root": str(data_root)},
        "params": {
            PARAMS[0]: {"type": "categorical", "choices": [0.002, 0.005]},
            PARAMS[1]: {"type": "categorical", "choices": [0.4, 0.5]},
            PARAMS[2]: {"type": "categorical", "choices": [0.002, 0.004]},
        },
        "searcher": {"name": "tpe", "seed": 0, "points_to_evaluate": POINTS},
        "scheduler": {"name": "none"},
        "budget": {"num_samples": 2, "max_concurrent": 2},
    }))
    return space


def search_command(folder: Path, name: str, uri: str, session_home: Path, data_root: Path, **env) -> subprocess.Popen:
    environment = {**os.environ, "HOME": str(session_home), "SELFTUNE_CACHE": str(session_home / "cache"),
                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    environment.pop("MLFLOW_TRACKING_URI", None)
    environment.pop("SELFTUNE_STORAGE", None)
    return subprocess.Popen(
        [sys.executable, "-m", "selftune", "search", str(write_space(folder, name, data_root)), "--tracking-uri", uri,
         "--out", str(folder / "runs")],
        cwd=folder, env=environment, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    with start_postgres() as store, start_mlflow_server(store, root / "artifacts", root / "mlflow-server.log") as (url, _):
        yield {"url": url, "root": root}


@pytest.fixture(scope="module")
def search(server, tmp_path_factory, session_home, small_synthetic):
    folder = tmp_path_factory.mktemp("search")
    started = time.monotonic()
    process = search_command(folder, "tracked", server["url"], session_home, small_synthetic)
    output = process.communicate(timeout=600)[0]
    print(f"search against the server: {time.monotonic() - started:.0f} s")
    assert process.returncode == 0, output[-4000:]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server["url"])
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    by_kind: dict[str, list] = {}
    for run in runs:
        by_kind.setdefault(run.data.tags.get("selftune.kind"), []).append(run)
    return {"folder": folder, "output": output, "client": client, "experiment": experiment, "runs": runs, **by_kind}


def test_search_logs_the_three_level_tree_through_the_server(search):
    assert not list(search["folder"].rglob("mlflow.db")), "a database file was written: something bypassed the server"
    assert "not logged" not in search["output"]
    (search_run,) = search["search"]
    trials, stages = search["trial"], search["stage"]
    assert len(trials) == 2 and len(stages) == 2 * len(STAGES)
    assert all(run.data.tags["mlflow.parentRunId"] == search_run.info.run_id for run in trials)
    trial_ids = {run.info.run_id for run in trials}
    assert all(run.data.tags["mlflow.parentRunId"] in trial_ids for run in stages)
    for trial in trials:
        children = sorted(run.data.tags["selftune.stage"] for run in stages if run.data.tags["mlflow.parentRunId"] == trial.info.run_id)
        assert children == sorted(STAGES)
        assert set(trial.data.params) == set(PARAMS)  # exactly the sampled values, by dotted name
        assert 0.0 <= trial.data.metrics["val/miou"] <= 1.0 and "objective" in trial.data.metrics
    assert sorted(tuple(float(t.data.params[p]) for p in PARAMS) for t in trials) == sorted(tuple(p.values()) for p in POINTS)
    assert not [run.info.run_id for run in search["runs"] if run.info.status != "FINISHED"], "a run was left RUNNING or failed"


def test_artifacts_download_through_the_server(search, server, tmp_path):
    client = search["client"]
    (search_run,) = search["search"]
    # Artifacts go through the server's proxy (mlflow-artifacts:/), not a path the client sees.
    assert search_run.info.artifact_uri.startswith("mlflow-artifacts:")
    results = Path(client.download_artifacts(search_run.info.run_id, "results.csv", str(tmp_path)))
    rows = list(csv.DictReader(results.open()))
    assert sorted(row["run_id"] for row in rows) == sorted(run.info.run_id for run in search["trial"])
    assert all(row["status"] == "FINISHED" and float(row["objective"]) >= 0 for row in rows)
    supervised = next(run for run in search["stage"] if run.data.tags["selftune.stage"] == "supervised")
    assert "confusion_matrix.png" in {item.path for item in client.list_artifacts(supervised.info.run_id)}
    png = Path(client.download_artifacts(supervised.info.run_id, "confusion_matrix.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((server["root"] / "artifacts").rglob("results.csv")), "artifacts not stored by the server"


# --- the MLflow UI in headless Chromium --------------------------------------------------------

METRIC_COLUMN = "val/miou"


@pytest.fixture
def browser_available() -> None:
    require_browser()


def test_mlflow_ui_lists_the_trials_with_params_and_val_miou(browser_available, search, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    with headless_chromium() as driver:
        wait = WebDriverWait(driver, 60)
        driver.get(f"{server['url']}/#/experiments/{search['experiment'].experiment_id}/runs")
        # Run names appear once the runs table has loaded.
        wait.until(EC.presence_of_element_located((By.XPATH, "//a[normalize-space()='search-tracked']")))
        _click_if_present(driver, "//button[@aria-label='Close']")  # the AI assistant side panel
        _click_if_present(driver, "//button[@aria-label='Toggle sidebar']")
        # MLflow 3 shows attribute columns only; pick the params and the metric to compare.
        driver.find_element(By.XPATH, "//button[@data-testid='column-selection-dropdown'][contains(., 'Columns')]").click()
        for column in [METRIC_COLUMN, *PARAMS]:
            wait.until(EC.element_to_be_clickable((By.XPATH, f"//span[normalize-space(text())='{column}']"))).click()
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        _expand(driver, 1)  # the search run: its trials appear
        _expand(driver, 2)  # the first trial: its stage runs appear (search -> trials -> stages)

        headers = wait.until(lambda d: _header_texts(d) if {METRIC_COLUMN, *PARAMS} <= _header_texts(d) else None)
        assert {METRIC_COLUMN, *PARAMS} <= headers
        table = driver.find_element(By.CSS_SELECTOR, ".ag-root").text
        shown = _numbers(table)
        for trial in search["trial"]:
            assert trial.info.run_name in table, f"trial run {trial.info.run_name} not listed:\n{table}"
            value = trial.data.metrics[METRIC_COLUMN]
            assert any(abs(number - value) < 1e-3 for number in shown), f"val/miou {value} not shown:\n{table}"
        for point in POINTS:
            for value in point.values():
                assert str(value) in table.split(), f"param value {value} not shown:\n{table}"
        assert "supervised" in table, f"the expanded trial's stage runs are not listed:\n{table}"

        screenshot = tmp_path / "mlflow-ui.png"
        _click_if_present(driver, "//h2 | //h1")  # move focus off the table's last clicked cell
        time.sleep(1)  # let the last rows paint
        driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
        if os.environ.get("SELFTUNE_UPDATE_SCREENSHOT") == "1":
            (REPO / "docs").mkdir(exist_ok=True)
            shutil.copyfile(screenshot, REPO / "docs" / "mlflow-ui.png")


def _click_if_present(driver, xpath: str) -> None:
    from selenium.webdriver.common.by import By

    for element in driver.find_elements(By.XPATH, xpath):
        if element.is_displayed():
            element.click()
            time.sleep(0.3)
            return


def _expand(driver, position: int) -> None:
    """Click the [+] beside the ``position``-th expandable run name (1-based, top to bottom)."""
    from selenium.webdriver.common.by import By

    xpath = "//div[@col-id='attributes.`Run Name`']//button[contains(@data-component-id, 'runnamecellrenderer')][not(normalize-space())]"
    buttons = [button for button in driver.find_elements(By.XPATH, xpath) if button.is_displayed()]
    if len(buttons) >= position:
        buttons[position - 1].click()
        time.sleep(0.7)  # expanding re-renders the rows


def _header_texts(driver) -> set[str]:
    from selenium.webdriver.common.by import By

    return {cell.text.strip() for cell in driver.find_elements(By.CSS_SELECTOR, "[role='columnheader']") if cell.text.strip()}


def _numbers(text: str) -> list[float]:
    numbers = []
    for token in text.split():
        try:
            numbers.append(float(token))
        except ValueError:
            continue
    return numbers


# --- the server going away mid-search ----------------------------------------------------------

def test_search_survives_the_server_going_away(server, tmp_path, session_home, small_synthetic):
    """A proxy in front of the server is closed once the first trial's first stage has ended: the
    search still ends (exit 0) with both trials' values from Tune, and says what was not logged."""
    proxy = TcpProxy(urlparse(server["url"]).port)
    started = time.monotonic()
    # MLflow retries an unreachable server for minutes per process (7 retries, backoff 2 s):
    # one quick try is enough here.
    process = search_command(tmp_path, "offline", proxy.url, session_home, small_synthetic,
                             MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if re.match(r"\s+trial \S+: stage 1/3", line):
                proxy.close()
                break
        output = "".join(lines) + process.communicate(timeout=600)[0]
    finally:
        proxy.close()
        if process.poll() is None:
            process.kill()
    print(f"search whose server went away: {time.monotonic() - started:.0f} s\n{output[-3000:]}")
    assert process.returncode == 0, output[-4000:]
    folder = next((tmp_path / "runs").glob("search-offline-*"))

    # Nothing is lost from Tune's own results: both trials, every stage's value.
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert len(rows) == 2 and all(row["status"] == "FINISHED" for row in rows), rows
    assert all(float(row["objective"]) >= 0 and row["self_train/val/miou"] for row in rows), rows
    assert sorted(tuple(float(row[p]) for p in PARAMS) for row in rows) == sorted(tuple(p.values()) for p in POINTS)

    # ... and the output ends by saying what MLflow did not get, with the details in a file.
    message = next(line for line in output.splitlines() if line.startswith(f"MLflow at {proxy.url} was unreachable from "))
    assert "not logged: " in message and f"details in {folder / 'not_logged.json'}" in message, message
    assert "stage run" in message or "metric batch" in message, message
    items = json.loads((folder / "not_logged.json").read_text())
    kinds = {item["kind"] for item in items}
    assert "end" in kinds, items  # the search run (at least) could not be ended
    assert {"run", "metrics"} & kinds, items
