"""The MLflow UI, in a real browser: two small ``selftune run``s logged to the test's own
``mlflow server``, the experiment opened in headless Chromium, and the runs table checked for the
runs, their params and ``val/miou``. The screenshot goes to ``tmp_path``; with
``SELFTUNE_UPDATE_SCREENSHOT=1`` it replaces ``docs/mlflow-ui.png`` (the README's picture).

Needs the Debian packages ``chromium`` and ``chromium-driver`` (CI installs them) and ``selenium``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from servers import run_selftune, start_tracking_server
from support import REPO, quickstart_overrides

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The runs table shows these next to the run names (a pipeline run's params are the resolved
# pipeline, flattened); the first one differs between the two runs.
PARAM_COLUMNS = ["stages.supervised.optimizer.lr", "stages.pseudo_label.threshold", "stages.self_train.pseudo_weight"]
METRIC_COLUMN = "val/miou"
LEARNING_RATES = ["0.002", "0.005"]
# The machine's network is closed: without these Chromium stalls on background connections.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1700,900",
]


def require_browser() -> None:
    """Skip (before any server or run is started) when Chromium, chromedriver or selenium is missing."""
    pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not Path(binary).exists():
            pytest.skip(f"{binary} missing: apt-get install -y chromium chromium-driver")


def browser(profile: Path):
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_mlflow_ui_lists_runs_with_params_and_val_miou(tmp_path):
    require_browser()
    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    with start_tracking_server(tmp_path / "server", backend="sqlite") as url:
        for index, lr in enumerate(LEARNING_RATES):
            result = run_selftune(
                ["run", str(REPO / "pipelines" / "quickstart.yaml"), *quickstart_overrides(epochs=1, steps=3),
                 "--set", f"stages.supervised.optimizer.lr={lr}", "--experiment", "dashboard",
                 "--out", str(tmp_path / f"out{index}"), "--tracking-uri", url],
                cwd=tmp_path,
            )
            assert result.returncode == 0, result.stdout + result.stderr
        client = MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("dashboard")
        pipelines = client.search_runs([experiment.experiment_id], "tags.`selftune.kind` = 'pipeline'")
        assert len(pipelines) == 2

        profile = Path(tempfile.mkdtemp(prefix="selftune-chromium-"))
        driver = browser(profile)
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(f"{url}/#/experiments/{experiment.experiment_id}/runs")
            # Run names appear once the runs table has loaded.
            wait.until(EC.presence_of_element_located((By.XPATH, "//a[normalize-space()='quickstart']")))
            _click_if_present(driver, "//button[@aria-label='Close']")  # the AI assistant side panel
            _click_if_present(driver, "//button[@aria-label='Toggle sidebar']")
            # MLflow 3 shows attribute columns only; pick the params and the metric to compare.
            driver.find_element(By.XPATH, "//button[@data-testid='column-selection-dropdown'][contains(., 'Columns')]").click()
            for column in [METRIC_COLUMN, *PARAM_COLUMNS]:
                wait.until(EC.element_to_be_clickable((By.XPATH, f"//span[normalize-space(text())='{column}']"))).click()
            driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
            _expand_parent_runs(driver)

            headers = wait.until(lambda d: _header_texts(d) if {METRIC_COLUMN, *PARAM_COLUMNS} <= _header_texts(d) else None)
            assert {METRIC_COLUMN, *PARAM_COLUMNS} <= headers
            table = driver.find_element(By.CSS_SELECTOR, ".ag-root").text
            for lr in LEARNING_RATES:
                assert lr in table, f"param value {lr} not shown:\n{table}"
            for run in pipelines:
                shown = _numbers(table)
                value = run.data.metrics[METRIC_COLUMN]
                assert any(abs(number - value) < 1e-3 for number in shown), f"val/miou {value} not shown:\n{table}"
            for stage in ("supervised", "pseudo_label", "self_train"):
                assert stage in table, f"stage run {stage} not listed under its pipeline run:\n{table}"

            screenshot = tmp_path / "mlflow-ui.png"
            _click_if_present(driver, "//h2 | //h1")  # move focus off the table's last clicked cell
            time.sleep(1)  # let the last rows paint
            driver.save_screenshot(str(screenshot))
            assert screenshot.stat().st_size > 10_000
            if os.environ.get("SELFTUNE_UPDATE_SCREENSHOT") == "1":
                (REPO / "docs").mkdir(exist_ok=True)
                shutil.copyfile(screenshot, REPO / "docs" / "mlflow-ui.png")
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)


def _click_if_present(driver, xpath: str) -> None:
    from selenium.webdriver.common.by import By

    for element in driver.find_elements(By.XPATH, xpath):
        if element.is_displayed():
            element.click()
            time.sleep(0.3)
            return


def _expand_parent_runs(driver) -> None:
    """Open the pipeline runs' stage children (the [+] button beside a parent run's name)."""
    from selenium.webdriver.common.by import By

    xpath = "//div[@col-id='attributes.`Run Name`']//button[contains(@data-component-id, 'runnamecellrenderer')][not(normalize-space())]"
    for index in range(len(driver.find_elements(By.XPATH, xpath))):
        buttons = driver.find_elements(By.XPATH, xpath)  # re-found: expanding re-renders the rows
        if index < len(buttons) and buttons[index].is_displayed():
            buttons[index].click()
            time.sleep(0.5)


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
