"""The console's pages and charts in headless Chromium against canned API answers (no service, no jobs run).

The console's files are served by a small static server with the console's Content-Security-Policy; in the
page, `fetch` is replaced by one that answers from `window.fdRoutes`, so a job can be made to look deleted,
cancelled or finished on cue. tests/api/test_console_browser.py drives the same pages against the real service.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from service_harness import wait_until
from test_console_browser import PAGE_TIMEOUT_S, chromium_driver

from api.web_console import CONSOLE_DIR, CONTENT_SECURITY_POLICY, MEDIA_TYPES

BLANK_PAGE = b'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>views</title></head>' \
             b'<body><main id="view"></main></body></html>'
PIXEL_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
# Installed before a view runs: every API call is answered from window.fdRoutes["METHOD /path"].
FAKE_FETCH = """
window.fdRoutes = {};
window.fdRequests = [];
sessionStorage.setItem("fd2.apiKey", "fd2_test_key");
const json = (body, status = 200) => new Response(JSON.stringify(body),
  { status, headers: { "Content-Type": "application/json" } });
window.fetch = async (input, init = {}) => {
  const url = new URL(typeof input === "string" ? input : input.url, window.location.href);
  const key = `${(init.method || "GET").toUpperCase()} ${url.pathname}`;
  window.fdRequests.push(key);
  const answer = window.fdRoutes[key];
  if (!answer) return json({ error: { code: "not_found", message: `${key} not found` } }, 404);
  if (answer.sse !== undefined) {
    return new Response(answer.sse, { status: 200, headers: { "Content-Type": "text/event-stream" } });
  }
  if (answer.png !== undefined) {
    const bytes = Uint8Array.from(atob(answer.png), (c) => c.charCodeAt(0));
    return new Response(bytes, { status: 200, headers: { "Content-Type": "image/png" } });
  }
  return json(answer.body, answer.status || 200);
};
"""
RUN_VIEW = """
const [module, name, args, done] = arguments;
import(module).then((views) => {
  window.fdController = new AbortController();
  views[name](document.getElementById("view"), ...args, window.fdController.signal)
    .catch((error) => { window.fdViewError = String(error); });
  done(null);
}).catch((error) => done(String(error)));
"""


class _ConsoleFiles(BaseHTTPRequestHandler):
    """`/` a blank page; `/console/…` the console's files; every answer with the console's policy."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        body, media_type = BLANK_PAGE, "text/html"
        if path.startswith("/console/"):
            relative = path[len("/console/"):] or "index.html"
            file = (CONSOLE_DIR / relative).resolve()
            if CONSOLE_DIR not in file.parents or not file.is_file() or file.suffix not in MEDIA_TYPES:
                self.send_error(404)
                return
            body, media_type = file.read_bytes(), MEDIA_TYPES[file.suffix]
        self.send_response(200)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ConsoleFiles)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = chromium_driver()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: Any, site: str) -> Iterator[Any]:
    """A blank page of the console's origin with the fake fetch; afterwards no script error or policy
    violation in the log and no view that threw."""
    browser.get(site + "/")
    browser.get_log("browser")  # drop what earlier tests left
    browser.execute_script(FAKE_FETCH)
    yield browser
    browser.execute_script("if (window.fdController) window.fdController.abort();")
    assert browser.execute_script("return window.fdViewError || null;") is None
    problems = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not problems, problems


# ---------------------------------------------------------------- helpers


def routes(driver: Any, answers: dict[str, Any]) -> None:
    """Add or replace canned answers: {"GET /v1/jobs/x": {"body": …}} (or {"sse": text}, {"png": base64})."""
    driver.execute_script("Object.assign(window.fdRoutes, arguments[0]);", answers)


def run_view(driver: Any, module: str, name: str, *args: Any) -> None:
    error = driver.execute_async_script(RUN_VIEW, f"/console/js/{module}", name, list(args))
    assert error is None, error


def read(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def text_of(driver: Any, css: str) -> str | None:
    return read(driver, "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css)


def shows(driver: Any, css: str) -> Any:
    return wait_until(lambda: read(driver, "return document.querySelector(arguments[0]) !== null;", css),
                      PAGE_TIMEOUT_S, interval_s=0.05, what=f"the page to show {css!r}")


def job(job_id: str, status: str = "succeeded", **fields: Any) -> dict[str, Any]:
    done = status not in ("queued", "running")
    return {"id": job_id, "status": status, "stage": "package" if done else "distill", "progress": 1.0 if done else 0.4,
            "stage_progress": 1.0 if done else 0.3, "eta_seconds": None if done else 30, "spec": {"method": "fd2",
            "ipc": 1}, "dataset_id": "ds_birds", "dataset_source": "upload", "created_at": "2025-01-01T00:00:00Z",
            "started_at": "2025-01-01T00:00:01Z", "finished_at": "2025-01-01T00:01:00Z" if done else None,
            "error": None, "metrics": {}, "artifacts": [], "cancel_requested": False, "artifacts_expired": False,
            **fields}


def sse(*events: dict[str, Any], end: str | None = None) -> str:
    text = "".join(f"id: {e['id']}\nevent: {e['kind']}\ndata: {json.dumps(e)}\n\n" for e in events)
    return text + (f"event: end\ndata: {json.dumps({'status': end})}\n\n" if end else "")


def event(event_id: int, kind: str, stage: str, stage_progress: float, **losses: float) -> dict[str, Any]:
    data: dict[str, Any] = {"stage_progress": stage_progress, "eta_seconds": None}
    if losses:
        data["losses"] = losses
    return {"id": event_id, "kind": kind, "stage": stage, "progress": 0.5, "message": "", "data": data,
            "created_at": "2025-01-01T00:00:00Z"}


def empty_list() -> dict[str, Any]:
    return {"body": {"items": [], "next_cursor": None}}


# ---------------------------------------------------------------- jobs list and job page


def test_the_jobs_list_names_deleted_datasets_and_manifests_and_says_done(page: Any):
    jobs = [job("job_deleted", dataset_id=None), job("job_manifest", "failed", dataset_id=None,
                                                      dataset_source="manifest", stage="distill"),
            job("job_running", "running"), job("job_cancelled", "cancelled", stage="relabel")]
    routes(page, {"GET /v1/jobs": {"body": {"items": jobs, "next_cursor": None}},
                  "GET /v1/datasets": {"body": {"items": [{"id": "ds_birds", "name": "birds"}], "next_cursor": None}}})
    run_view(page, "views/jobs.js", "jobsView")
    shows(page, 'tr[data-job-id="job_cancelled"]')

    def row(job_id: str, cell: str) -> str | None:
        return text_of(page, f'tr[data-job-id="{job_id}"] td.{cell}')

    assert row("job_deleted", "dataset") == "(deleted dataset)"
    assert read(page, "return document.querySelector('tr[data-job-id=\"job_deleted\"] td.dataset a');") is None
    assert row("job_manifest", "dataset") == "manifest"
    assert text_of(page, 'tr[data-job-id="job_running"] td.dataset a') == "birds"
    assert row("job_deleted", "stage") == "done"
    assert row("job_running", "stage") == "distill"
    assert row("job_manifest", "stage") == "stopped in distill"
    assert row("job_cancelled", "stage") == "stopped in relabel"


def test_a_job_whose_dataset_was_deleted_labels_its_preview_from_the_report(page: Any):
    artifacts = [{"name": n, "size": 10, "sha256": "0" * 64, "media_type": t, "url": ""}
                 for n, t in (("preview.png", "image/png"), ("report.json", "application/json"))]
    report = {"dataset": {"classes": ["wren", "<b>finch</b>", "robin"]}, "comparison": {"verdict": None}}
    finished = job("job_orphan", dataset_id="ds_gone", artifacts=artifacts, metrics={"student_accuracy": 0.4})
    routes(page, {"GET /v1/jobs/job_orphan": {"body": finished},
                  "GET /v1/jobs/job_orphan/events": {"sse": sse(end="succeeded")},
                  "GET /v1/jobs/job_orphan/artifacts/report.json": {"body": report},
                  "GET /v1/jobs/job_orphan/artifacts/preview.png": {"png": PIXEL_PNG}})
    run_view(page, "views/job.js", "jobView", "job_orphan")
    shows(page, "ol.row-labels li")
    assert text_of(page, "#job-dataset") == "(deleted dataset)"
    assert read(page, "return document.querySelector('#job-dataset a');") is None
    labels = read(page, "return [...document.querySelectorAll('ol.row-labels li')].map((li) => li.textContent);")
    assert labels == report["dataset"]["classes"]
    assert read(page, "return document.querySelector('ol.row-labels b');") is None  # names stay text
    assert text_of(page, "#job-stage") == "done"
    assert "GET /v1/datasets/ds_gone" in read(page, "return window.fdRequests;")


def test_a_job_without_dataset_id_shows_deleted_dataset_not_manifest(page: Any):
    routes(page, {"GET /v1/jobs/job_nodata": {"body": job("job_nodata", "failed", dataset_id=None)},
                  "GET /v1/jobs/job_nodata/events": {"sse": sse(end="failed")}})
    run_view(page, "views/job.js", "jobView", "job_nodata")
    shows(page, "#job-dataset")
    assert text_of(page, "#job-dataset") == "(deleted dataset)"


def test_a_job_on_several_workers_lists_its_shards_and_their_workers(page: Any):
    items = [{"id": "pretrain:m0", "stage": "pretrain", "status": "done", "worker": "gpu-a:11", "attempts": 1,
              "progress": 1.0},
             {"id": "distill:c00000", "stage": "distill", "status": "running", "worker": "gpu-a:11", "attempts": 2,
              "progress": 0.25},
             {"id": "distill:c00100", "stage": "distill", "status": "dispatched", "worker": None, "attempts": 0,
              "progress": 0.0}]
    shards = {"total": 3, "queued": 0, "dispatched": 1, "running": 1, "done": 1, "failed": 0, "cancelled": 0,
              "items": items}
    routes(page, {"GET /v1/jobs/job_wide": {"body": job("job_wide", "running", shards=shards)},
                  "GET /v1/jobs/job_wide/events": {"sse": sse()},
                  "GET /v1/datasets/ds_birds": {"body": {"id": "ds_birds", "name": "birds", "classes": []}}})
    run_view(page, "views/job.js", "jobView", "job_wide")
    shows(page, "#job-shards table.shards tbody tr")
    assert text_of(page, "#job-shards > span") == "3 shards: 1 done · 1 running · 1 dispatched"
    rows = read(page, "return [...document.querySelectorAll('#job-shards tbody tr')].map((tr) => "
                      "[...tr.children].map((td) => td.textContent));")
    assert rows == [["pretrain:m0", "done", "gpu-a:11", "1", "100 %"],
                    ["distill:c00000", "running", "gpu-a:11", "2", "25 %"],
                    ["distill:c00100", "dispatched", "–", "0", "0 %"]]
    read(page, "if (window.fdController) window.fdController.abort();")


def test_a_job_on_one_worker_shows_no_shards(page: Any):
    routes(page, {"GET /v1/jobs/job_one": {"body": job("job_one", shards=None)},
                  "GET /v1/jobs/job_one/events": {"sse": sse(end="succeeded")}})
    run_view(page, "views/job.js", "jobView", "job_one")
    shows(page, "#job-stage")
    assert read(page, "return document.querySelector('#job-shards');") is None


def test_the_cancellation_note_goes_once_the_job_has_ended(page: Any):
    running = job("job_live", "running")
    routes(page, {"GET /v1/jobs/job_live": {"body": running},
                  "POST /v1/jobs/job_live/cancel": {"body": {**running, "cancel_requested": True}, "status": 202},
                  "GET /v1/jobs/job_live/events": {"sse": sse()},
                  "GET /v1/datasets/ds_birds": {"body": {"id": "ds_birds", "name": "birds", "classes": []}}})
    run_view(page, "views/job.js", "jobView", "job_live")
    shows(page, "#cancel-job")
    routes(page, {"GET /v1/jobs/job_live": {"body": {**running, "cancel_requested": True}}})
    read(page, "document.querySelector('#cancel-job').click();")
    shows(page, "#cancel-note")
    assert "Cancellation requested" in text_of(page, "#cancel-note")
    routes(page, {"GET /v1/jobs/job_live": {"body": job("job_live", "cancelled", stage="distill")}})
    wait_until(lambda: text_of(page, "#job-summary .status") == "cancelled", PAGE_TIMEOUT_S, interval_s=0.05,
               what="the page to show cancelled")
    assert text_of(page, "#cancel-note") is None
    assert text_of(page, "#job-message") == ""
    assert text_of(page, "#job-stage") == "stopped in distill"


# ---------------------------------------------------------------- loss charts

DRAW_CHART = """
const [events, done] = arguments;
import("/console/js/chart.js").then(({ lossSeries, lossChart }) => {
  const stages = lossSeries(events);
  const view = document.getElementById("view");
  view.replaceChildren(...[...stages].map(([stage, series]) => lossChart(stage, series)));
  done(null);
}).catch((error) => done(String(error)));
"""


def draw(driver: Any, events: list[dict[str, Any]]) -> None:
    error = driver.execute_async_script(DRAW_CHART, events)
    assert error is None, error


def chart_facts(driver: Any, stage: str) -> dict[str, Any]:
    """What the stage's chart drew: tick labels with their boxes, and per loss term its lines and markers."""
    return read(driver, """
      const figure = document.querySelector(`figure.loss-chart[data-stage="${arguments[0]}"]`);
      const svg = figure.querySelector("svg");
      const [, , width, height] = svg.getAttribute("viewBox").split(" ").map(Number);
      const box = (e) => { const b = e.getBBox(); return [b.x, b.y, b.x + b.width, b.y + b.height]; };
      return {
        width, height,
        xTicks: [...svg.querySelectorAll("text.x-tick")].map((t) => t.textContent),
        labels: [...svg.querySelectorAll("text")].map(box),
        series: Object.fromEntries([...svg.querySelectorAll("g.series")].map((g) => [g.dataset.loss, {
          lines: [...g.querySelectorAll("polyline")].map((p) => p.getAttribute("points").split(" ")
            .map((xy) => xy.split(",").map(Number))),
          markers: [...g.querySelectorAll("g.single-point")].map((m) => m.querySelector("text").textContent),
        }])),
        legend: [...figure.querySelectorAll("ul.legend li")].map((li) => li.textContent),
      };
    """, stage)


def test_the_x_axis_is_the_stage_s_progress_in_percent_and_no_label_is_clipped(page: Any):
    draw(page, [event(1, "stage_start", "distill", 0.0)]
         + [event(i, "progress", "distill", p, loss=2.0 - p) for i, p in enumerate((0.0045, 0.3, 0.946, 1.2), 2)])
    facts = chart_facts(page, "distill")
    assert facts["xTicks"] == ["0 %", "25 %", "50 %", "75 %", "100 %"]
    for x0, y0, x1, y1 in facts["labels"]:
        assert 0 <= x0 and x1 <= facts["width"] and 0 <= y0 and y1 <= facts["height"], (x0, x1, facts["width"])
    [line] = facts["series"]["loss"]["lines"]
    xs = [x for x, _ in line]
    assert xs == sorted(xs) and len(xs) == 4 and xs[-1] == max(xs)  # 120 % is drawn at 100 %
    assert 0 < xs[0] < xs[1] and xs[-1] < facts["width"]


def test_a_stage_with_one_progress_event_draws_a_marker_with_its_value(page: Any):
    draw(page, [event(1, "stage_start", "relabel", 0.0), event(2, "progress", "relabel", 0.5, relabel_loss=0.4321)])
    facts = chart_facts(page, "relabel")
    assert facts["series"]["relabel_loss"] == {"lines": [], "markers": ["0.432"]}
    assert facts["legend"] == ["relabel_loss: 0.432"]


def test_evaluate_s_two_students_are_two_lines_and_a_resumed_stage_is_not_joined(page: Any):
    students = [event(i, "progress", "evaluate", p, student_loss=3 - 4 * p) for i, p in enumerate((0.1, 0.3, 0.5), 1)]
    baseline = [event(i, "progress", "evaluate", p, random_baseline_loss=5 - 4 * p)
                for i, p in enumerate((0.6, 0.8, 1.0), 10)]
    resumed = [event(20, "stage_start", "distill", 0.0), event(21, "progress", "distill", 0.2, loss=1.0),
               event(22, "progress", "distill", 0.6, loss=0.8), event(23, "progress", "distill", 0.3, loss=0.9),
               event(24, "progress", "distill", 0.7, loss=0.7)]
    draw(page, students + baseline + resumed)
    evaluate = chart_facts(page, "evaluate")["series"]
    assert set(evaluate) == {"student_loss", "random_baseline_loss"}
    assert [len(evaluate[name]["lines"]) for name in ("student_loss", "random_baseline_loss")] == [1, 1]
    assert max(x for x, _ in evaluate["student_loss"]["lines"][0]) < \
        min(x for x, _ in evaluate["random_baseline_loss"]["lines"][0])
    distill = chart_facts(page, "distill")["series"]["loss"]["lines"]
    assert len(distill) == 2 and all(len(line) == 2 for line in distill)  # progress went back: a new line


# ---------------------------------------------------------------- the page itself


def test_the_nav_stays_hidden_until_a_key_is_given(browser: Any, site: str):
    browser.get(site + "/console/")
    browser.execute_script("sessionStorage.clear();")
    browser.get(site + "/console/#/jobs")
    browser.refresh()
    shows(browser, "#api-key")
    assert read(browser, "return getComputedStyle(document.getElementById('nav')).display;") == "none"
    assert read(browser, "return getComputedStyle(document.getElementById('forget-key')).display;") == "none"
    icon = read(browser, "return document.querySelector('link[rel=icon]').href;")
    assert icon == site + "/console/favicon.svg"
