"""The ``/web`` playground (``server/playground.py``).

* Without a browser (default run): ``/`` redirects to ``/docs`` without the web UI and to
  ``/web/`` with it; the page's controls are the action registry's (a copy of the package
  with one more action module gets one more control); the session store is bounded and
  closes what it drops.
* In a real browser (``uv run pytest -m browser``): headless Chromium, driven by Selenium
  through the Debian chromedriver, plays ``sum_of_evens_wrong_modulus`` from the task list
  to ``solved``, fixing line 5 by editing it in the page. Screenshots of each stage go to
  ``$PLAYGROUND_SCREENSHOTS`` (default: the test's tmp dir); with
  ``PLAYGROUND_README_SCREENSHOT=1`` the mid-episode one is also written to
  ``docs/playground.png`` (the README's picture).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import REPO, ServerProcess, run_in_package_copy
from tracefix_rl.settings import load_settings

TASK = "sum_of_evens_wrong_modulus"
FIND_EXAMPLE = re.compile(
    r"<!-- example-action:begin -->\n```python\n(.*?)```\n<!-- example-action:end -->", re.S
)
README_SCREENSHOT = REPO / "docs" / "playground.png"
WINDOW_WIDTH = 1400


def test_root_redirects_to_the_api_docs_without_the_web_ui():
    from tracefix_rl.server.app import create_tracefix_app

    app = create_tracefix_app(load_settings({"enable_web_interface": False}))
    client = TestClient(app)  # no lifespan: the redirect needs neither tasks nor sandbox
    answer = client.get("/", follow_redirects=False)
    assert answer.status_code == 307 and answer.headers["location"] == "/docs"
    assert "/" not in app.openapi()["paths"]
    assert client.get("/web/", follow_redirects=False).status_code == 404


PROBE = """
import json, sys
from pathlib import Path

from tracefix_rl.actions import ACTIONS
from tracefix_rl.settings import load_settings
from tracefix_rl.server.app import create_tracefix_app
from fastapi.testclient import TestClient

report = {}
app = create_tracefix_app(load_settings({"enable_web_interface": True}))
client = TestClient(app)
report["root"] = client.get("/", follow_redirects=False).headers.get("location")
report["generic"] = [client.post("/web/reset", json={"task_id": "nope"}).status_code,
                     client.post("/web/step", json={"action": {}}).status_code,
                     client.get("/web/state").status_code,
                     client.get("/web/metadata").status_code]

from tracefix_rl.server import playground as pg

report["gradio_stub_written"] = Path(pg.__file__).with_suffix(".pyi").exists()
report["registry"] = [[a.name, list(a.Params.model_fields)] for a in ACTIONS]
report["controls"] = [[c.action, [f.name for f in c.fields]] for c in pg.control_specs()]
report["prefill"] = [c.action for c in pg.control_specs() if c.range_prefill]
blocks = app.state.playground.build(None, [], None, False, "t", "")
report["ids"] = sorted(b.elem_id for b in blocks.blocks.values() if getattr(b, "elem_id", None))
report["quick_start"] = pg.quick_start_markdown("http://example:8000")

# parsing a control's fields into the wire action (bad input is a message, not a step)
replace = next(c for c in pg.control_specs() if c.action == "REPLACE_LINES")
action = pg.build_action(replace, ["5", " 5 ", "        if n % 2 == 0:"])
report["action"] = action.model_dump(exclude_none=True, exclude={"metadata"})
errors = []
for values in (["", "5", "x"], ["five", "5", "x"]):
    try:
        pg.build_action(replace, values)
    except pg.PlaygroundError as exc:
        errors.append(str(exc))
trace = next(c for c in pg.control_specs() if c.action == "TRACE")
report["trace"] = pg.build_action(trace, ["2", "4, 5", "total\\n n % 2 "]).model_dump(
    exclude_none=True, exclude={"metadata"})
report["errors"] = errors

# the session store: bounded, and what it drops is closed
class Env:
    closed = False
    def close(self):
        self.closed = True

sessions = pg.PlaySessions(Env, capacity=1, evict_idle_s=3600)
first = sessions.open("browser-1")
try:
    sessions.open("browser-2")
    report["full"] = None
except pg.PlaygroundError as exc:
    report["full"] = str(exc)
sessions.evict_idle_s = 0
second = sessions.open("browser-2")
report["evicted"] = [first.closed, first.env.closed, second.closed, len(sessions)]
sessions.close_browser("browser-2")
report["unloaded"] = [second.env.closed, len(sessions)]
third = sessions.open(None)
sessions.expire(third)
report["expired"] = [third.env.closed, len(sessions)]
print(json.dumps(report))
"""


def test_the_controls_derive_from_the_registry_and_root_redirects_to_the_playground(tmp_path):
    """A copy of the package with the FIND action module of docs/development.md: the page gets a
    FIND control with FIND's one field, beside one control per other action."""
    example = FIND_EXAMPLE.search((REPO / "docs" / "development.md").read_text())
    assert example is not None
    done = run_in_package_copy(tmp_path, {"actions/find.py": example.group(1)}, TASK, PROBE)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["root"] == "/web/"
    # openenv's generic UI's JSON routes (a shared episode, 500s on bad input) are gone
    assert report["generic"] == [404, 404, 404, 200]
    assert report["gradio_stub_written"] is False
    assert report["controls"] == report["registry"]
    assert ["FIND", ["text"]] in report["controls"]
    assert [name for name, _ in report["controls"]] == [
        "VIEW_CODE", "FIND", "RUN_TESTS", "TRACE", "REPLACE_LINES", "UNDO_EDIT",
        "RESET_TO_ORIGINAL", "SUBMIT",
    ]  # fmt: skip
    assert report["prefill"] == ["REPLACE_LINES"]
    for action, fields in report["controls"]:
        assert f"tf-action-{action.lower()}" in report["ids"]
        for field in fields:
            assert f"tf-{action.lower()}-{field}" in report["ids"]
    for action, _ in report["controls"]:
        assert f"| `{action}` |" in report["quick_start"]
    assert "from tracefix_rl import TraceFixAction, TraceFixEnv" in report["quick_start"]
    assert 'TraceFixEnv(base_url="http://example:8000")' in report["quick_start"]
    assert "message=" not in report["quick_start"]
    fix = "        if n % 2 == 0:"
    assert report["action"] == {"action_type": "REPLACE_LINES", "start_line": 5,
                                "end_line": 5, "new_code_block": fix}  # fmt: skip
    assert report["trace"] == {"action_type": "TRACE", "test": 2, "lines": [4, 5],
                               "watch": ["total", "n % 2"]}  # fmt: skip
    assert report["errors"] == [
        "REPLACE_LINES needs start_line: First line to replace (1-indexed).",
        "start_line must be a whole number, not 'five'",
    ]
    assert report["full"] and "try again in" in report["full"]
    assert report["evicted"] == [True, True, False, 1]
    assert report["unloaded"] == [True, 0]
    assert report["expired"] == [True, 0]


# -- in a real browser -----------------------------------------------------------------------


def _browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.access(chromium, os.X_OK) and os.access(driver, os.X_OK)):
        missing = ("needs Debian's chromium and chromium-driver (apt-get install -y chromium "
                   "chromium-driver)")  # fmt: skip
        if os.environ.get("CI"):  # .ci/run installs them: never pass CI without the browser
            pytest.fail(missing)
        pytest.skip(missing)
    return chromium, driver


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Headless Chromium through the Debian chromedriver (never a downloaded one)."""
    chromium, driver_path = _browser_binaries()
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", f"--window-size={WINDOW_WIDTH},1000"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PLAYGROUND_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    """The playground in ``driver``: waits, clicks that wait for gradio's overlays, text of
    elements, full-page screenshots."""

    def __init__(self, driver: Any, artifacts: Path, timeout: float = 60) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.artifacts = artifacts
        self.wait = WebDriverWait(driver, timeout)
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}

    def find(self, selector: str) -> Any:
        """The element of a CSS selector, or of an XPath (starting with ``//``)."""
        from selenium.webdriver.common.by import By

        by = By.XPATH if selector.startswith("//") else By.CSS_SELECTOR
        return self.wait.until(lambda d: d.find_element(by, selector))

    def text(self, selector: str) -> str:
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(By.CSS_SELECTOR, selector)
        return found[0].text if found else ""

    def until(self, condition: Callable[[], Any], what: str) -> Any:
        try:
            return self.wait.until(lambda _: condition())
        except Exception as exc:
            self.shot(f"failed-{what}")
            raise AssertionError(f"the page never showed {what}") from exc

    def click(self, selector: str) -> None:
        """Click, once no gradio overlay (a pending event) covers the element."""
        from selenium.common.exceptions import (
            ElementClickInterceptedException,
            ElementNotInteractableException,
        )

        element = self.find(selector)

        def clicked() -> bool:
            try:
                element.click()
                return True
            except (ElementClickInterceptedException, ElementNotInteractableException):
                return False

        self.until(clicked, f"a clickable {selector}")

    def tab(self, label: str) -> None:
        """Open the tab labelled ``label``."""
        self.click(f"//button[@role='tab' and normalize-space()='{label}']")

    def field(self, elem_id: str) -> Any:
        """The text input of a gradio Textbox."""
        return self.find(f"#{elem_id} textarea, #{elem_id} input")

    def mark(self, stage: str) -> None:
        self.timings[stage] = round(time.perf_counter() - self.started, 2)

    def shot(self, name: str) -> Path:
        """A screenshot of the whole page, beyond the window (Chrome's DevTools protocol)."""
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        data = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": clip},
        )["data"]
        path = self.artifacts / f"{name}.png"
        path.write_bytes(base64.b64decode(data))
        return path


@pytest.mark.browser
def test_a_person_plays_an_episode_to_solved_in_a_real_browser(browser, artifacts, start_server):
    started = time.perf_counter()
    server: ServerProcess = start_server(extra_env={"ENABLE_WEB_INTERFACE": "true"})
    server_start_s = time.perf_counter() - started
    assert httpx.get(f"{server.url}/", follow_redirects=False).headers["location"] == "/web/"
    page = Page(browser, artifacts)

    browser.get(f"{server.url}/")  # / redirects to the playground
    page.find("#tf-task-id input")
    assert browser.current_url.rstrip("/").endswith("/web")
    page.mark("loaded")
    page.shot("01-loaded")

    # a bad input is a message in the page, and costs no step
    page.click("#tf-play-id")
    page.until(lambda: "Choose a task" in page.text("#tf-status"), "the missing-task message")

    # pick the task by id in the searchable list
    page.click("#tf-task-id input")
    page.find("#tf-task-id input").send_keys(TASK)
    option = f"li[role=option][aria-label^='{TASK} (']"
    page.click(option)
    page.click("#tf-play-id")
    page.until(lambda: TASK in page.text("#tf-task"), "the task")
    assert "return the sum of the even integers" in page.text("#tf-description")
    assert "if n % 2 == 1:" in page.text("#tf-code")
    assert "50 steps left" in page.text("#tf-status")
    page.mark("task started")
    page.shot("02-task")

    page.click("#tf-action-run_tests")
    page.until(lambda: "FAIL" in page.text("#tf-tests"), "failing tests")
    assert "expected 6, got 4" in page.text("#tf-tests")
    assert "1 passed, 3 failed" in page.text("#tf-output")
    assert "visible tests 1/4" in page.text("#tf-status")
    page.mark("tests run")
    page.shot("03-tests")

    # TRACE without its test: the page says what is missing; no step is spent
    page.tab("TRACE")
    page.click("#tf-action-trace")
    page.until(lambda: "TRACE needs test" in page.text("#tf-status"), "the TRACE message")
    assert "49 steps left" in page.text("#tf-status")

    # REPLACE_LINES: choosing line 5 prefills the block with it; edit 1 into 0 in the page
    page.tab("REPLACE_LINES")
    start = page.field("tf-replace_lines-start_line")
    start.click()
    start.send_keys("5")
    block = "#tf-replace_lines-new_code_block .cm-content"
    page.until(lambda: "if n % 2 == 1:" in page.text(block), "line 5 in the block")
    assert "        if n % 2 == 1:" in page.text(block)  # as shown: indentation kept
    assert page.field("tf-replace_lines-end_line").get_attribute("value") == "5"
    from selenium.webdriver.common.keys import Keys

    page.click(block)
    page.find(block).send_keys(Keys.END, Keys.BACKSPACE, Keys.BACKSPACE, "0:")
    page.until(lambda: "if n % 2 == 0:" in page.text(block), "the edited block")
    page.mark("line edited")
    page.shot("04-edited")

    page.click("#tf-action-replace_lines")
    page.until(lambda: "if n % 2 == 0:" in page.text("#tf-code"), "the fixed program")
    assert "changed since the original: line 5" in page.text("#tf-marks")
    assert "REPLACE_LINES" in page.text("#tf-history")
    page.mark("line replaced")
    mid = page.shot("05-replaced")
    if os.environ.get("PLAYGROUND_README_SCREENSHOT") == "1":
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(mid, README_SCREENSHOT)

    page.click("//button[contains(normalize-space(), 'Diff against the original')]")
    page.click("#tf-diff-show")
    page.until(lambda: "+        if n % 2 == 0:" in page.text("#tf-diff"), "the diff")

    page.click("#tf-action-submit")
    outcome = page.find("#tf-outcome")
    assert outcome.get_attribute("data-solved") == "true"
    assert outcome.get_attribute("data-score") == "1.000"
    assert "Solved" in outcome.text and "score 1.000" in outcome.text
    assert "truncated: false" in outcome.text
    assert "4/4" in page.text("#tf-status") and "12/12 tests pass" in page.text("#tf-output")
    page.mark("submitted")
    page.shot("06-solved")

    page.tab("README")
    page.until(lambda: "debugging gym" in page.text("#tf-readme"), "the README")
    page.shot("07-readme")
    page.tab("Quick Start")
    page.until(lambda: "from tracefix_rl import TraceFixAction, TraceFixEnv"
               in page.text("#tf-quick-start"), "the Quick Start")  # fmt: skip
    assert server.url in page.text("#tf-quick-start")
    page.shot("08-quick-start")

    timings = {"server_start_s": round(server_start_s, 2), **page.timings}
    (artifacts / "timings.json").write_text(json.dumps(timings, indent=2))
    print(f"playground timings (s): {timings}; screenshots in {artifacts}", file=sys.stderr)
    assert "Traceback" not in server.log()
