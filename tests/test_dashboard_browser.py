"""The dashboard on a store made by a real (tiny) ablation: page logic with Streamlit's AppTest, then
the served app in a real headless chromium driven by Playwright, every page screenshotted."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from brats_lab.ablation.study import DEFAULT_STORAGE, make_plan, run_study

pytestmark = [
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning"),
    pytest.mark.xdist_group("dashboard-project"),  # one xdist worker trains the shared project once
]

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"


def _load_screenshots():
    spec = importlib.util.spec_from_file_location("dashboard_screenshots", ROOT / "dashboard" / "screenshots.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def project(copy_phantoms, tmp_path_factory: pytest.TempPathFactory, tiny_ablation) -> Path:
    """A project folder after a real two-arm, two-fold ablation on four phantom cases."""
    root = tmp_path_factory.mktemp("dashboard-project")
    copy_phantoms(root / "phantom")
    (root / "tiny.toml").write_text(tiny_ablation())
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run_study(make_plan("tiny.toml", "cpu", None, str(root / "phantom"), DEFAULT_STORAGE), progress=False)
    return root


@pytest.fixture
def in_project(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(project)
    return project


def test_cases_page_draws_the_worst_case_with_both_arms_predictions(in_project):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, at.exception
    at.sidebar.radio[0].set_value("Cases").run()
    assert not at.exception, at.exception
    assert not at.warning, [w.value for w in at.warning]  # images, ground truth and predictions all found
    worst = at.dataframe[0].value
    assert worst["dice_ET"].tolist() == sorted(worst["dice_ET"].tolist())
    images = at.get("image")
    # four modalities, then the ground truth and each arm's prediction over T1ce
    assert len(images) == 4 + 1 + 2
    assert any(h.value.startswith(f"{worst['case'].iloc[0]} (fold") for h in at.subheader)

    for view in ("coronal", "sagittal"):
        at.radio(key="view").set_value(view).run()
        assert not at.exception, (view, at.exception)
        assert len(at.get("image")) == 7
    at.slider(key="opacity").set_value(1.0).run()
    assert not at.exception


def test_compare_page_shows_the_verdict_curves_and_every_fold(in_project):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=60).run()
    at.sidebar.radio[0].set_value("Compare").run()
    assert not at.exception, at.exception
    headers = [h.value for h in at.subheader]
    assert "Each arm against the baseline" in headers and "Training curves" in headers
    charts = at.get("plotly_chart")
    assert len(charts) == 4  # per-case boxes, one mark per run (fold and seed), the verdict with CIs, the curves
    at.radio[0].set_value("hd95").run()
    assert not at.exception, at.exception
    assert at.multiselect[0].value == ["att_equiunet fold 0", "att_equiunet fold 1", "equiunet fold 0", "equiunet fold 1"]


def _wait_until_up(url: str, server: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            assert server.poll() is None, f"the server exited with {server.returncode}"
            assert time.monotonic() < deadline, f"{url} did not answer within {seconds:.0f} s"
            time.sleep(0.3)


def test_every_page_in_a_real_browser(in_project, tmp_path, free_port):
    screenshots = _load_screenshots()
    if screenshots.find_chromium() is None:
        if os.environ.get("BRATS_LAB_REQUIRE_BROWSER"):
            pytest.fail("BRATS_LAB_REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium: install Debian's `chromium` (`.ci/run` does) to run the browser test")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "brats_lab.cli", "dashboard", "--port", str(port)],
                              cwd=in_project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/_stcore/health", server)
        result = screenshots.capture(f"http://127.0.0.1:{port}/", tmp_path / "screenshots")
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=30)
    assert result.problems == [], result.problems
    assert set(result.screenshots) == {"Studies", "Compare", "Cases"}
    assert all(p.stat().st_size > 10_000 for p in result.screenshots.values())  # real pictures, not blank pages
    assert result.images_on_cases == 7
    assert "Traceback" not in out, out[-3000:]


def test_cases_page_reads_predictions_from_a_remote_mlflow_server(project, tmp_path, monkeypatch, free_port):
    """The same app on a tracking server (served artifacts): predictions are downloaded over HTTP."""
    import numpy as np
    import pandas as pd
    from streamlit.testing.v1 import AppTest

    from brats_lab import tracking
    from brats_lab.data.cases import discover
    from brats_lab.io import read_image, write_image

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "served")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/health", server)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        monkeypatch.chdir(tmp_path)
        case = discover(project / "phantom")[0]
        seg, geometry = read_image(case.seg, np.uint8)
        arm = tracking.arm_run("brats-lab", "remote", "pipeline A", {"pipeline": "A"})
        with tracking.fold_run(arm, 0, "pipeline A fold 0") as run:
            run.log_params({"data.dataset": str(project / "phantom")})
            write_image(seg, geometry, tmp_path / "upload" / f"{case.id}.nii.gz")
            run.log_artifact(tmp_path / "upload" / f"{case.id}.nii.gz", "predictions")
            run.log_table(pd.DataFrame({"case": [case.id], "dice_ET": [0.5], "dice_TC": [0.6], "dice_WT": [0.7]}),
                          "per_case_metrics.csv")
        arm.finish()
        assert run.artifact_dir() is None  # really remote: nothing to read from a local folder

        at = AppTest.from_file(str(APP), default_timeout=60).run()
        at.sidebar.radio[0].set_value("Cases").run()
        assert not at.exception, at.exception
        assert not at.warning, [w.value for w in at.warning]
        assert len(at.get("image")) == 4 + 1 + 1  # modalities, ground truth, the one arm's prediction
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
