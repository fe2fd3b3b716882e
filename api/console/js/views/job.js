// One job: live status and progress (the job re-read every second while it is queued or running, its events
// followed over the server-sent-events stream for the loss curves and the log), cancel and delete, and once
// it has finished the report, the images and the artifacts.

import { apiFetch, getJSON, seg } from "../api.js";
import { lossChart, lossSeries } from "../chart.js";
import { h, replace, table } from "../dom.js";
import { duration, when } from "../format.js";
import { followJobEvents } from "../sse.js";
import { ACTIVE, errorNote, jobDataset, notFound, pollTimer, progressBar, stageText, statusBadge } from "./common.js";
import { artifactsSection, imagesSection, loadReport, reportSection } from "./job_results.js";

const POLL_MS = 1000;
const LOG_ROWS = 50;
const CHART_DELAY_MS = 300;
const STAGES = ["pretrain", "distill", "relabel", "evaluate", "package"];
const NOT_FOUND_TEXT = "No job with this id is visible with this key: it does not exist, was deleted, or belongs "
  + "to another tenant.";

function field(label, ...value) {
  return [h("dt", {}, label), h("dd", {}, ...value)];
}

function specLine(spec) {
  const parts = [["method", spec.method], ["preset", spec.preset], ["ipc", spec.ipc], ["backbone", spec.backbone],
    ["image size", spec.image_size], ["device", spec.device]];
  return parts.filter(([, value]) => value !== undefined && value !== null).map(([k, v]) => `${k} ${v}`).join(" · ");
}

/** A job spread over several workers: the counts by status and one row per shard with its worker. */
function shardsView(shards) {
  const counts = ["done", "running", "dispatched", "queued", "failed", "cancelled"]
    .filter((status) => shards[status]).map((status) => `${shards[status]} ${status}`).join(" · ");
  return h("div", { id: "job-shards" }, h("span", {}, `${shards.total} shards: ${counts}`),
    table(["Shard", "Status", "Worker", "Attempts", "Progress"], shards.items.map((item) =>
      [item.id, item.status, item.worker || "–", String(item.attempts), `${Math.round(item.progress * 100)} %`]),
    { class: "shards" }));
}

/** {dataset, gone}: the job's dataset, or gone (404: deleted meanwhile; the job still shows). */
async function readDataset(id, signal) {
  if (!id) return { dataset: null, gone: false };
  try {
    return { dataset: await getJSON(`/v1/datasets/${seg(id)}`, { signal }), gone: false };
  } catch (error) {
    return { dataset: null, gone: Boolean(error.notFound) };
  }
}

/** The preview's row labels: the class names the job ran with (report.json's dataset.classes), so they stay
 * right after the dataset was deleted; the dataset's own list where there is no report. */
function previewClasses(report, dataset) {
  const classes = report && report.dataset && report.dataset.classes;
  if (Array.isArray(classes) && classes.length) return classes.map(String);
  return dataset && Array.isArray(dataset.classes) ? dataset.classes : null;
}

export async function jobView(root, jobId, signal) {
  let job;
  try {
    job = await getJSON(`/v1/jobs/${seg(jobId)}`, { signal });
  } catch (error) {
    if (error.notFound) {
      replace(root, notFound("Job", NOT_FOUND_TEXT));
      return;
    }
    throw error;
  }
  const timer = pollTimer(signal);
  const urls = [];
  signal.addEventListener("abort", () => urls.forEach((url) => URL.revokeObjectURL(url)), { once: true });
  const keepURL = (url) => {
    urls.push(url);
    return url;
  };
  const summary = h("section", { id: "job-summary" });
  const message = h("div", { id: "job-message" });
  const results = h("div", { id: "job-results" });
  const losses = h("section", { id: "job-losses" }, h("h2", {}, "Losses"));
  const charts = h("div", { class: "charts" }, h("p", { class: "empty" }, "No losses reported yet."));
  const log = h("div", { class: "log" });
  losses.append(charts);
  replace(root,
    h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "← Jobs")),
    h("h1", {}, "Job ", h("code", { id: "job-id" }, job.id)),
    summary, message, results, losses,
    h("section", { id: "job-log" }, h("h2", {}, "Events"), log));
  const { dataset, gone } = await readDataset(job.dataset_id, signal);
  const showError = (error) => replace(message, errorNote(error));
  let cancelNote = null; // "Cancellation requested…", shown until the job has ended

  async function cancel(button) {
    button.disabled = true;
    try {
      const answer = await (await apiFetch(`/v1/jobs/${seg(job.id)}/cancel`, { method: "POST", signal })).json();
      if (ACTIVE.has(answer.status)) { // a queued job is cancelled at once: nothing to wait for
        cancelNote = h("p", { class: "info", id: "cancel-note" },
          "Cancellation requested; the job stops within seconds.");
        replace(message, cancelNote);
        if (!ACTIVE.has(job.status)) renderSummary(); // the poll saw the end first: no note to keep
      }
    } catch (error) {
      showError(error);
    }
    timer.wake();
  }

  async function remove(button) {
    if (!window.confirm(`Delete job ${job.id} with its artifacts, events and work folder? This cannot be undone.`)) {
      return;
    }
    button.disabled = true;
    try {
      await apiFetch(`/v1/jobs/${seg(job.id)}`, { method: "DELETE", signal });
      window.location.hash = "#/jobs";
    } catch (error) {
      button.disabled = false;
      showError(error);
    }
  }

  const fields = h("dl", { class: "fields" });
  const actions = h("div", { class: "actions" });
  summary.append(fields, actions);
  let actionsFor = null;

  function renderActions() {
    const state = `${job.status}|${job.cancel_requested}`;
    if (state === actionsFor) return; // keep the buttons in place while only the progress moves
    actionsFor = state;
    if (ACTIVE.has(job.status)) {
      const button = h("button", { type: "button", id: "cancel-job", disabled: job.cancel_requested }, "Cancel job");
      button.addEventListener("click", () => cancel(button));
      replace(actions, button);
    } else {
      const button = h("button", { type: "button", id: "delete-job", class: "danger" }, "Delete job");
      button.addEventListener("click", () => remove(button));
      replace(actions, button);
    }
  }

  function renderSummary() {
    const active = ACTIVE.has(job.status);
    if (!active && cancelNote) {
      cancelNote.remove(); // the status says how it ended
      cancelNote = null;
    }
    replace(fields,
      field("Status", statusBadge(job.status), job.cancel_requested && active ? " (cancel requested)" : null),
      field("Stage", h("span", { id: "job-stage" }, stageText(job))),
      field("Progress", progressBar(job.progress, "overall progress", "job-progress")),
      field("Stage progress", progressBar(job.stage_progress, "stage progress", "job-stage-progress")),
      field("ETA", h("span", { id: "job-eta" }, active ? duration(job.eta_seconds) : "–")),
      job.shards ? field("Shards", shardsView(job.shards)) : null,
      field("Dataset", h("span", { id: "job-dataset" }, jobDataset(job, dataset ? dataset.name : null, gone))),
      field("Spec", specLine(job.spec || {})),
      field("Created", when(job.created_at)),
      field("Started", when(job.started_at)),
      field("Finished", when(job.finished_at)),
      job.error ? field("Error", h("span", { class: "error", id: "job-error" },
        `${job.error.message} (${job.error.code})`)) : null,
      job.artifacts_expired ? field("Artifacts", h("strong", { class: "expired" }, "artifacts expired")) : null);
    renderActions();
  }

  async function renderResults() {
    const report = await loadReport(job, signal);
    const images = await imagesSection(job, previewClasses(report, dataset), signal, keepURL);
    if (signal.aborted) return;
    replace(results, reportSection(job, report), images, artifactsSection(job, showError));
  }

  const events = [];
  let chartsPending = false;
  function renderEvents() {
    chartsPending = false;
    const stages = lossSeries(events);
    const ordered = [...stages.keys()].sort((a, b) => STAGES.indexOf(a) - STAGES.indexOf(b));
    if (ordered.length) replace(charts, ordered.map((stage) => lossChart(stage, stages.get(stage))));
    replace(log, table(["Time", "Kind", "Stage", "Message"], events.slice(-LOG_ROWS).map((event) =>
      [new Date(event.created_at).toLocaleTimeString(), event.kind, event.stage || "", event.message]),
    { class: "events" }));
  }
  followJobEvents(job.id, {
    signal,
    onEvent(event) {
      events.push(event);
      if (!chartsPending) {
        chartsPending = true;
        setTimeout(renderEvents, CHART_DELAY_MS);
      }
      if (event.kind !== "progress" && event.kind !== "log") timer.wake();
    },
    onEnd: () => timer.wake(),
    onError: () => {},
  });

  renderSummary();
  while (ACTIVE.has(job.status) && !signal.aborted) {
    await timer.wait(POLL_MS);
    if (signal.aborted) return;
    try {
      job = await getJSON(`/v1/jobs/${seg(job.id)}`, { signal });
    } catch (error) {
      if (signal.aborted) return;
      if (error.notFound) {
        replace(root, notFound("Job", NOT_FOUND_TEXT));
        return;
      }
      showError(error);
      continue;
    }
    renderSummary();
  }
  if (!signal.aborted) await renderResults();
}
