"""The web console in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`) driven by
Selenium against a real embedded service (uvicorn + a Celery worker) with real jobs.

What the page shows must be what the API says: the job page's accuracies, artifact sizes and sha256 equal the
job resource's; a running job's progress moves on the page; cancel and delete work from the page; another
tenant's job is "not found"; a dataset's per-class counts are shown, and hostile names stay text. Skipped with
the reason printed when Selenium, Chromium or chromedriver is missing (`.ci/run` installs the browser).
"""

from __future__ import annotations

import shutil
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from pipeline_helpers import tiny_spec
from service_harness import TEST_STALE_HEARTBEAT_S, ServiceStack, service_env, wait_until

pytestmark = pytest.mark.service

HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_CLASSES = [HOSTILE, '"><svg onload=alert(2)>', "plain", 'Ünïcödé & "quotes"']
JOB_TIMEOUT_S = 240
PAGE_TIMEOUT_S = 30
FINAL = {"succeeded", "failed", "cancelled"}
# A committee of two teachers, so the report has members to show.
COMMITTEE_SPEC = tiny_spec(device="cpu", committee=[{"backbone": "convnet", "model_width": 16},
                                                    {"backbone": "convnet", "model_width": 12}])
# Long enough (minutes on two cores, even on an idle machine) that progress can be watched on two pages and the
# job cancelled mid-run; it is cancelled long before it would end.
SLOW_DISTILL_SPEC = tiny_spec(device="cpu", ipc=3, distill_iterations=3000, evaluate=False,
                              eval_random_baseline=False)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
KEY_ITEM = "fd2.apiKey"


def browser_unavailable() -> str | None:
    """Why no browser test can run here (None when Selenium, Chromium and chromedriver are all present)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "Selenium is not installed (pip install -e '.[dev]')"
    if not any(shutil.which(name) for name in CHROMIUM_NAMES):
        return "no Chromium binary (apt-get install chromium chromium-driver; .ci/run does this)"
    if not shutil.which("chromedriver"):
        return "no chromedriver binary (apt-get install chromium-driver; .ci/run does this)"
    return None


# ---------------------------------------------------------------- fixtures


def chromium_driver() -> Any:
    """Headless Chromium under chromedriver, keeping the page's console log; skips the test when unavailable."""
    reason = browser_unavailable()
    if reason:
        print(f"browser tests skipped: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n))
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1366,1100", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    return driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = chromium_driver()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def stack(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    """A running embedded API + worker (started only when a browser is there)."""
    root = tmp_path_factory.mktemp("console")
    env = {"FD2_HOME": str(root / "home"), "FD2_STALE_HEARTBEAT_S": str(TEST_STALE_HEARTBEAT_S)}
    with ExitStack() as resources:
        service = ServiceStack("embedded", service_env(env), root / "logs")
        resources.callback(service.stop)
        try:
            service.start()
        except BaseException:
            print(service.log_tail())
            raise
        yield service


@dataclass
class Tenant:
    key: str
    client: httpx.Client


@pytest.fixture(scope="module")
def tenant(stack: ServiceStack) -> Iterator[Tenant]:
    key = stack.create_key("console-alpha")
    with stack.client(key) as client:
        yield Tenant(key, client)


@pytest.fixture(scope="module")
def other_tenant(stack: ServiceStack) -> Iterator[Tenant]:
    key = stack.create_key("console-beta")
    with stack.client(key) as client:
        yield Tenant(key, client)


@pytest.fixture(scope="module")
def dataset(tenant: Tenant, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A ready dataset whose name and class names are markup."""
    archive = hostile_zip(tmp_path_factory.mktemp("upload"))
    with archive.open("rb") as handle:
        response = tenant.client.post("/v1/datasets", files={"file": (archive.name, handle, "application/zip")},
                                      data={"name": HOSTILE})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "ready" and sorted(body["classes"]) == sorted(HOSTILE_CLASSES), body
    return body


@pytest.fixture(scope="module")
def finished_job(stack: ServiceStack, tenant: Tenant, dataset: dict[str, Any]) -> dict[str, Any]:
    job = submit_job(tenant.client, dataset["id"], COMMITTEE_SPEC)
    job = wait_for_status(tenant.client, job["id"], FINAL)
    assert job["status"] == "succeeded", (job["error"], stack.log_tail())
    return job


@pytest.fixture
def page(browser: Any, stack: ServiceStack) -> Iterator[Any]:
    """The browser for one test; afterwards, no script error and no Content-Security-Policy violation."""
    browser.get_log("browser")  # drop what earlier tests left
    yield browser
    problems = [entry["message"] for entry in browser.get_log("browser")
                if entry["level"] == "SEVERE" and not expected_network_error(entry["message"])]
    assert not problems, problems


# ---------------------------------------------------------------- helpers


def hostile_zip(folder: Path) -> Path:
    """fgsynth images in class folders named after HOSTILE_CLASSES (train/ and test/), zipped."""
    from fd2_core.data import fgsynth

    data = fgsynth.generate(num_classes=len(HOSTILE_CLASSES), image_size=32, train_per_class=12,
                            test_per_class=4, seed=5)
    tree = fgsynth.write_imagefolder(data, folder / "tree")
    archive = folder / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for split in ("train", "test"):
            for old, new in zip(sorted(p.name for p in (tree / split).iterdir()), HOSTILE_CLASSES, strict=True):
                for image in sorted((tree / split / old).iterdir()):
                    out.write(image, f"{split}/{new}/{image.name}")
    return archive


def expected_network_error(message: str) -> bool:
    """A failed fetch the page handles on purpose (another tenant's 404, a wrong key's 401)."""
    return "status of 404" in message or "status of 401" in message


def submit_job(client: httpx.Client, dataset_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={"dataset": {"id": dataset_id}, "spec": spec})
    assert response.status_code == 202, response.text
    return response.json()


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str],
                    timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    return wait_until(lambda: (job := get_job(client, job_id))["status"] in statuses and job, timeout_s,
                      interval_s=0.3, what=f"job {job_id} to reach {sorted(statuses)}")


def open_console(driver: Any, stack: ServiceStack, key: str, route: str) -> None:
    """Open the console at `#<route>` with `key` in the tab's session storage (as the key prompt leaves it)."""
    driver.get(f"{stack.base_url}/console/")
    driver.execute_script("sessionStorage.setItem(arguments[0], arguments[1]);", KEY_ITEM, key)
    driver.get(f"{stack.base_url}/console/#{route}")
    driver.refresh()


def find(driver: Any, css: str, timeout_s: float = PAGE_TIMEOUT_S) -> Any:
    from selenium.webdriver.common.by import By

    return wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, css), timeout_s, interval_s=0.1,
                      what=f"the page to show {css!r}")[0]


def click(driver: Any, css: str) -> None:
    """Click the element, looked up again if a re-render replaced it between the look-up and the click."""
    from selenium.common.exceptions import StaleElementReferenceException

    def clicked() -> bool:
        try:
            find(driver, css).click()
        except StaleElementReferenceException:
            return False
        return True

    wait_until(clicked, PAGE_TIMEOUT_S, interval_s=0.1, what=f"a click on {css!r}")


def find_all(driver: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def read(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def text_of(driver: Any, css: str) -> str:
    """The element's text read in one script call (no stale handle while the page re-renders it)."""
    return read(driver, "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)


def progress_of(driver: Any, css: str) -> float | None:
    return read(driver, "const p = document.querySelector(arguments[0]); return p ? p.value : null;", css)


def watch_progress(driver: Any, css: str, running: Callable[[], bool], timeout_s: float) -> list[float]:
    """Progress values shown by the page while the job runs, until two different ones were seen rising."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and running():
        value = progress_of(driver, css)
        if value is not None and (not seen or value != seen[-1]):
            seen.append(value)
        if len(seen) >= 3 and seen[-1] > seen[-2] > 0:
            return seen
        time.sleep(0.25)
    return seen


def screenshot(driver: Any, path: Path) -> Path:
    """The whole page (the window grown to the document's height for the shot), saved and its path printed."""
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    full = read(driver, "return document.documentElement.scrollHeight;")
    driver.set_window_size(width, min(max(height, full + 150), 8000))
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(width, height)
    print(f"screenshot: {path}")
    return path


def percent(value: float) -> str:
    """What the console's `(100 * value).toFixed(1)` shows: the exact binary value rounded half away from zero
    (Python's own format rounds an exact tie such as 31.25 to even, 31.2; JavaScript shows 31.3)."""
    shown = Decimal(100 * value).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return f"{shown} %"


def no_alert(driver: Any) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        _ = driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


# ---------------------------------------------------------------- scenarios


def test_the_key_prompt_keeps_the_key_in_the_session_and_forgets_it(page: Any, stack: ServiceStack,
                                                                       tenant: Tenant):
    page.get(f"{stack.base_url}/console/")
    read(page, "sessionStorage.clear();")
    page.refresh()
    find(page, "#api-key").send_keys("fd2_00000000_not-a-real-key")
    find(page, "#key-form button[type=submit]").click()
    wait_until(lambda: "not accepted" in text_of(page, "#key-form"), PAGE_TIMEOUT_S, what="the refusal")
    assert read(page, "return sessionStorage.getItem(arguments[0]);", KEY_ITEM) is None

    find(page, "#api-key").send_keys(tenant.key)
    find(page, "#key-form button[type=submit]").click()
    find(page, "#jobs-table")
    assert read(page, "return sessionStorage.getItem(arguments[0]);", KEY_ITEM) == tenant.key
    assert tenant.key not in page.current_url
    assert read(page, "return document.cookie;") == ""

    find(page, "#forget-key").click()
    find(page, "#api-key")
    assert read(page, "return sessionStorage.getItem(arguments[0]);", KEY_ITEM) is None


def test_finished_job_page_shows_the_api_s_numbers(page: Any, stack: ServiceStack, tenant: Tenant,
                                                   finished_job: dict[str, Any], tmp_path: Path):
    job = get_job(tenant.client, finished_job["id"])
    open_console(page, stack, tenant.key, f"/jobs/{job['id']}")
    find(page, "#report-table")
    find(page, "#job-artifacts")

    assert find(page, "#job-id").text == job["id"]
    assert find(page, "#job-summary .status").text == "succeeded"
    assert progress_of(page, "#job-progress progress") == 1.0
    for key in ("student_accuracy", "random_baseline_accuracy", "teacher_accuracy"):
        cell = find(page, f'#report-table td[data-metric="{key}"]')
        assert float(cell.get_attribute("data-value")) == job["metrics"][key], key
        assert cell.text == percent(job["metrics"][key]), key
    for key in ("ior", "beats_random", "verdict"):
        assert find_all(page, f'#report-table td[data-metric="{key}"]'), key
    report = tenant.client.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert find(page, "#verdict-message").text == report["comparison"]["verdict"]["message"]
    members = find_all(page, ".members-table tr[data-member]")
    assert [row.get_attribute("data-member") for row in members] == [m["name"] for m in report["teacher"]["members"]]
    for row, member in zip(members, report["teacher"]["members"], strict=True):
        cell = row.find_element("css selector", 'td[data-metric="test_accuracy"]')
        assert float(cell.get_attribute("data-value")) == member["test_accuracy"]

    shown = {row.get_attribute("data-artifact"): row for row in find_all(page, "#job-artifacts tr[data-artifact]")}
    assert set(shown) == {artifact["name"] for artifact in job["artifacts"]}
    for artifact in job["artifacts"]:
        row = shown[artifact["name"]]
        size = row.find_element("css selector", ".artifact-size")
        assert int(size.get_attribute("data-value")) == artifact["size"]
        assert f"({artifact['size']} bytes)" in size.text
        assert row.find_element("css selector", ".artifact-sha256").text == artifact["sha256"]

    preview = find(page, 'img.artifact-image[data-artifact="preview.png"]')
    assert preview.get_attribute("src").startswith("blob:")
    wait_until(lambda: read(page, "return arguments[0].complete && arguments[0].naturalWidth;", preview),
               PAGE_TIMEOUT_S, what="the preview image to load")
    labels = [li.get_attribute("textContent") for li in find_all(page, "ol.row-labels li")]
    assert labels == get_dataset(tenant.client, job["dataset_id"])["classes"]
    assert not find_all(page, 'img[src="x"]') and no_alert(page)
    events = all_events(tenant.client, job["id"])
    if any((event.get("data") or {}).get("losses") for event in events):
        find(page, "figure.loss-chart svg polyline, figure.loss-chart svg circle")
    screenshot(page, tmp_path / "job-page.png")


def test_running_job_progress_moves_then_cancel_and_delete_from_the_page(
    page: Any, stack: ServiceStack, tenant: Tenant, dataset: dict[str, Any], finished_job: dict[str, Any],
    tmp_path: Path,
):
    job = submit_job(tenant.client, dataset["id"], SLOW_DISTILL_SPEC)
    running = lambda: get_job(tenant.client, job["id"])["status"] in ("queued", "running")
    open_console(page, stack, tenant.key, "/jobs")
    row = f'tr[data-job-id="{job["id"]}"]'
    find(page, row)
    listed = watch_progress(page, f"{row} progress", running, JOB_TIMEOUT_S / 2)
    assert len(listed) >= 3 and listed[-1] > listed[-2], f"progress on the list did not move: {listed}"
    assert text_of(page, f'tr[data-job-id="{finished_job["id"]}"] .status') == "succeeded"
    screenshot(page, tmp_path / "job-list.png")

    click(page, f'{row} a[href="#/jobs/{job["id"]}"]')
    find(page, "#cancel-job")
    seen = watch_progress(page, "#job-progress progress", running, JOB_TIMEOUT_S / 2)
    assert len(seen) >= 3 and seen[-1] > seen[-2], f"progress on the job page did not move: {seen}"
    assert get_job(tenant.client, job["id"])["status"] == "running", "the job ended before it could be cancelled"

    click(page, "#cancel-job")
    cancelled = wait_for_status(tenant.client, job["id"], FINAL, timeout_s=30)
    assert cancelled["status"] == "cancelled"
    wait_until(lambda: text_of(page, "#job-summary .status") == "cancelled", PAGE_TIMEOUT_S,
               what="the page to show cancelled")

    find(page, "#delete-job").click()
    wait_until(lambda: not no_alert(page), PAGE_TIMEOUT_S, what="the confirmation")
    page.switch_to.alert.accept()
    wait_until(lambda: page.current_url.endswith("#/jobs"), PAGE_TIMEOUT_S, what="the jobs list")
    assert tenant.client.get(f"/v1/jobs/{job['id']}").status_code == 404
    wait_until(lambda: not find_all(page, row), PAGE_TIMEOUT_S, what="the deleted job to leave the list")


def test_another_tenant_s_job_and_dataset_are_not_found(page: Any, stack: ServiceStack, other_tenant: Tenant,
                                                        finished_job: dict[str, Any], dataset: dict[str, Any]):
    open_console(page, stack, other_tenant.key, f"/jobs/{finished_job['id']}")
    assert find(page, ".not-found h1").text == "Job not found"
    assert not find_all(page, "#report-table") and not find_all(page, "#job-artifacts")

    page.get(f"{stack.base_url}/console/#/datasets/{dataset['id']}")
    wait_until(lambda: text_of(page, ".not-found h1") == "Dataset not found", PAGE_TIMEOUT_S,
               what="dataset not found")
    page.get(f"{stack.base_url}/console/#/jobs")
    find(page, "#jobs-table .empty, #jobs-table table")
    assert not find_all(page, f'tr[data-job-id="{finished_job["id"]}"]')


def test_dataset_page_shows_counts_and_hostile_names_as_text(page: Any, stack: ServiceStack, tenant: Tenant,
                                                             dataset: dict[str, Any], finished_job: dict[str, Any]):
    open_console(page, stack, tenant.key, "/datasets")
    link = find(page, f'tr[data-dataset-id="{dataset["id"]}"] a')
    assert link.text == HOSTILE
    link.click()
    find(page, "#class-table")

    assert find(page, "#dataset-name").text == HOSTILE
    rows = find_all(page, "#class-table tbody tr")
    shown = {row.find_element("css selector", ".class-name").text: row for row in rows}
    assert set(shown) == set(dataset["classes"])
    for name, counts in dataset["per_class"].items():
        assert int(shown[name].find_element("css selector", ".train-count").text) == counts["train"], name
        assert int(shown[name].find_element("css selector", ".test-count").text) == counts["test"], name
    assert find(page, "#dataset-skipped h2").text == f"Skipped files ({len(dataset['errors'])})"

    page.get(f"{stack.base_url}/console/#/jobs/{finished_job['id']}")  # names in the job page's row labels too
    find(page, "ol.row-labels li")
    for hostile in ('img[src="x"]', "svg[onload]", "img[onerror]"):
        assert not find_all(page, hostile), hostile
    assert no_alert(page)


# Last: it marks the shared finished job's artifacts as expired, as the retention sweep would.
def test_expired_artifacts_are_shown_as_expired(page: Any, stack: ServiceStack, tenant: Tenant,
                                                finished_job: dict[str, Any]):
    from datetime import datetime, timezone

    from service_harness import embedded_settings

    from store.db import session_scope
    from store.retention import mark_artifacts_expired

    with session_scope(embedded_settings(Path(stack.env["FD2_HOME"]))) as session:
        assert mark_artifacts_expired(session, [finished_job["id"]], datetime.now(timezone.utc)) == 1
    job = get_job(tenant.client, finished_job["id"])
    assert job["artifacts_expired"]

    open_console(page, stack, tenant.key, f"/jobs/{job['id']}")
    assert find(page, "#artifacts-expired").text.startswith("Artifacts expired")
    assert find(page, "#job-summary .expired").text == "artifacts expired"
    rows = find_all(page, "#job-artifacts tr[data-artifact]")
    assert len(rows) == len(job["artifacts"])  # still listed, with sizes and checksums, as a record
    assert all(not button.is_enabled() for button in find_all(page, "#job-artifacts button.download"))
    assert not find_all(page, "img.artifact-image")
    assert float(find(page, '#report-table td[data-metric="student_accuracy"]').get_attribute("data-value")) == \
        job["metrics"]["student_accuracy"]


def get_dataset(client: httpx.Client, dataset_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/datasets/{dataset_id}")
    assert response.status_code == 200, response.text
    return response.json()


def all_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/jobs/{job_id}/events")
    assert response.status_code == 200, response.text
    return response.json()["items"]
