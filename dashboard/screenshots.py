"""Open every page of a running dashboard in headless chromium, screenshot it, report what is wrong.

    python dashboard/screenshots.py http://127.0.0.1:8501/ docs/ [ROW]   # with `brats-lab dashboard` running

ROW (default 0): which study of the Studies table to open, 0 being the newest.

Drives Debian's chromium (`/usr/bin/chromium`, or $BRATS_LAB_CHROMIUM) through Playwright's Python
package, which downloads no browser of its own. The browser test uses `capture` too, and made the
README's pictures. A page fails when Streamlit shows an exception element or the page's own
content does not appear. Playwright (a dev dependency) is imported when `capture` runs.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Flags for a container without a display, GPU, user namespaces or network beyond loopback.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # a cold page on two busy cores: reads the store, the per-case tables, the volumes


@dataclass
class Capture:
    screenshots: dict[str, Path] = field(default_factory=dict)  # page name -> PNG
    problems: list[str] = field(default_factory=list)  # one line each; empty when every page is fine
    images_on_cases: int = 0  # slices drawn on the Cases page


def find_chromium() -> str | None:
    return os.environ.get("BRATS_LAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def capture(url: str, out_dir: Path, chromium: str | None = None, width: int = 1500, row: int = 0) -> Capture:
    """Visit Studies, open study number `row` (0: the newest) by clicking its row, then Compare and Cases."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = Capture()
    executable = chromium or find_chromium()
    if executable is None:
        raise FileNotFoundError("no chromium found: install Debian's `chromium` or set BRATS_LAB_CHROMIUM")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 2000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)

            def settle(name: str, marker: str) -> None:
                """Wait for `marker` and for Streamlit to finish the run, then check and screenshot."""
                try:
                    page.get_by_text(marker, exact=False).first.wait_for()
                    page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached")
                    page.wait_for_timeout(800)  # let Plotly and the images lay themselves out
                except PlaywrightError as e:
                    result.problems.append(f"{name}: {marker!r} never appeared ({str(e).splitlines()[0]})")
                for error in page.locator('[data-testid="stException"]').all():
                    result.problems.append(f"{name}: exception on the page: {error.inner_text()[:300]}")
                png = out_dir / f"dashboard_{name.lower()}.png"
                page.screenshot(path=str(png), full_page=True)
                result.screenshots[name] = png

            settle("Studies", "Choose a row to open the study")
            # Open the study the way a person does: click its row in the table (rows are 35 px high).
            grid = page.locator('[data-testid="stDataFrame"]').first.bounding_box()
            if grid is None:
                result.problems.append("Studies: no table of studies")
            else:
                page.mouse.click(grid["x"] + 12, grid["y"] + 35 * (row + 1) + 17)
            settle("Compare", "Mean (std) over folds")
            page.locator('[data-testid="stSidebar"]').get_by_text("Cases", exact=True).click()
            settle("Cases", "Label opacity")
            result.images_on_cases = page.locator('[data-testid="stMain"] [data-testid="stImage"] img').count()
        finally:
            browser.close()
    return result


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    result = capture(argv[0], Path(argv[1]), row=int(argv[2]) if len(argv) == 3 else 0)
    for name, png in result.screenshots.items():
        print(f"{name}: {png}")
    for problem in result.problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
