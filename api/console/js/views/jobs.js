// The jobs list: newest first, re-read every few seconds (faster while a job is queued or running), so
// status, stage, progress and ETA move on their own.

import { getJSON } from "../api.js";
import { h, replace, table } from "../dom.js";
import { duration, when } from "../format.js";
import { ACTIVE, errorNote, jobDataset, jobLink, pollTimer, progressBar, stageText, statusBadge } from "./common.js";

const ACTIVE_POLL_MS = 1000;
const IDLE_POLL_MS = 5000;
const PAGE = 50;
const MAX_LIMIT = 200;

function jobRow(job, names) {
  const spec = job.spec || {};
  return h("tr", { "data-job-id": job.id },
    h("td", {}, jobLink(job.id)),
    h("td", {}, statusBadge(job.status)),
    h("td", { class: "stage" }, stageText(job)),
    h("td", {}, progressBar(job.progress, `progress of job ${job.id}`)),
    h("td", { class: "eta" }, ACTIVE.has(job.status) ? duration(job.eta_seconds) : "–"),
    h("td", { class: "method" }, `${spec.method ?? "–"} · ipc ${spec.ipc ?? "–"}`),
    h("td", { class: "dataset" }, jobDataset(job, names.get(job.dataset_id))),
    h("td", {}, when(job.created_at)));
}

/** id → name of the tenant's datasets (the newest page), to name each job's dataset; empty on failure. */
async function datasetNames(signal) {
  try {
    const page = await getJSON(`/v1/datasets?limit=${MAX_LIMIT}`, { signal });
    return new Map(page.items.map((dataset) => [dataset.id, dataset.name]));
  } catch {
    return new Map();
  }
}

export async function jobsView(root, signal) {
  let limit = PAGE;
  const timer = pollTimer(signal);
  const holder = h("div", { id: "jobs-table" }, h("p", { class: "hint" }, "Loading…"));
  const more = h("button", { type: "button", id: "jobs-more", hidden: true }, "Show older jobs");
  more.addEventListener("click", () => {
    limit = Math.min(MAX_LIMIT, limit + PAGE);
    timer.wake();
  });
  replace(root, h("h1", {}, "Jobs"), holder, more);
  const names = await datasetNames(signal);

  while (!signal.aborted) {
    let delay = IDLE_POLL_MS;
    try {
      const page = await getJSON(`/v1/jobs?limit=${limit}`, { signal });
      if (signal.aborted) return;
      if (!page.items.length) {
        replace(holder, h("p", { class: "empty" }, "No jobs yet. Submit one with POST /v1/jobs (see the README)."));
      } else {
        replace(holder, table(["Job", "Status", "Stage", "Progress", "ETA", "Method", "Dataset", "Created"],
          page.items.map((job) => jobRow(job, names)), { class: "jobs" }));
      }
      more.hidden = !page.next_cursor || limit >= MAX_LIMIT;
      if (page.items.some((job) => ACTIVE.has(job.status))) delay = ACTIVE_POLL_MS;
    } catch (error) {
      if (signal.aborted) return;
      replace(holder, errorNote(error));
    }
    await timer.wait(delay);
  }
}
