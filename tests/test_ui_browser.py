"""`brats-lab ui` prints links that open each experiment on its runs, checked in a real headless
chromium (Debian's, driven by Playwright, as the dashboard's browser test does)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from brats_lab import tracking

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]


def _chromium() -> str:
    found = os.environ.get("BRATS_LAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("BRATS_LAB_REQUIRE_BROWSER"):
            pytest.fail("BRATS_LAB_REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium: install Debian's `chromium` (`.ci/run` does) to run the browser test")
    return found


def test_ui_links_open_the_runs_in_the_model_training_view(tmp_path: Path, free_port) -> None:
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    arm = tracking.arm_run("ablation-links", "hash", "arm equiunet", {"pipeline": "A"}, root=tmp_path)
    with tracking.fold_run(arm, 0, "equiunet fold 0"):
        pass
    arm.finish()
    empty = tracking.get_or_create_experiment("no-runs-yet", root=tmp_path)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "brats_lab.cli", "ui", "--port", str(port)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        lines = [proc.stdout.readline() for _ in range(4)]  # the address, a heading, one line per experiment
        links = dict(re.findall(r"^\s+(\S+)\s+(http://\S+)$", "".join(lines), re.M))
        assert links == {
            "ablation-links": f"http://127.0.0.1:{port}/#/experiments/{arm.experiment_id}/runs?workflowType=machine_learning",
            "no-runs-yet": f"http://127.0.0.1:{port}/#/experiments/{empty}/runs?workflowType=machine_learning",
        }, lines
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "the UI did not answer within 90 s"
                time.sleep(0.3)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 1000})  # a new user: no stored view
                page.set_default_timeout(90_000)
                page.goto(links["ablation-links"])
                page.get_by_text("arm equiunet", exact=True).first.wait_for()  # the arm run, in the runs table
                assert "/runs" in page.url and "workflowType=machine_learning" in page.url
                page.screenshot(path=str(tmp_path / "ui_runs.png"))
                # Why the query: the plain experiment address lands a new user on the GenAI pages.
                plain = browser.new_page()
                plain.set_default_timeout(90_000)
                plain.goto(f"http://127.0.0.1:{port}/#/experiments/{arm.experiment_id}")
                plain.wait_for_url(re.compile(r".*workflowType=genai.*"))
            finally:
                browser.close()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
