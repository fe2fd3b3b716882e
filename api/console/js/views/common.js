// Pieces shared by the pages: status badges, progress bars, the "not found" page and error notes.

import { h } from "../dom.js";
import { percent } from "../format.js";

const KNOWN_STATUSES = new Set(["queued", "running", "succeeded", "failed", "cancelled", "validating", "ready",
  "invalid"]);
export const ACTIVE = new Set(["queued", "running"]);
export const DELETED_DATASET = "(deleted dataset)";

export function statusBadge(status) {
  const known = KNOWN_STATUSES.has(status) ? status : "other";
  return h("span", { class: `status status-${known}`, "data-status": String(status) }, String(status));
}

export function progressBar(value, label, id) {
  const fraction = typeof value === "number" && Number.isFinite(value) ? Math.min(1, Math.max(0, value)) : 0;
  return h("span", { class: "progress", id },
    h("progress", { max: 1, value: fraction, "aria-label": label || "progress" }),
    h("span", { class: "progress-text" }, percent(fraction, 0)));
}

export function notFound(what, explanation) {
  return h("section", { class: "not-found" },
    h("h1", {}, `${what} not found`),
    h("p", {}, explanation));
}

export function errorNote(error) {
  const code = error && error.code ? ` (${error.code})` : "";
  return h("p", { class: "error", role: "alert" }, `${(error && error.message) || String(error)}${code}`);
}

/** A poll timer: `wait(ms)` resolves after ms, at once on `wake()`, or when the page is left. */
export function pollTimer(signal) {
  let wakeUp = () => {};
  signal.addEventListener("abort", () => wakeUp(), { once: true });
  return {
    wait(ms) {
      return new Promise((resolve) => {
        const timer = setTimeout(resolve, ms);
        wakeUp = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    },
    wake() {
      wakeUp();
    },
  };
}

export function jobLink(id) {
  return h("a", { href: `#/jobs/${encodeURIComponent(id)}`, class: "id" }, id);
}

export function datasetLink(id, label) {
  return h("a", { href: `#/datasets/${encodeURIComponent(id)}` }, label || id);
}

/**
 * Where a job's data came from: a link to its dataset, "manifest", or "(deleted dataset)" as plain text when
 * the dataset is gone (`dataset_id` null on an upload job, or `gone` when the dataset answered 404).
 */
export function jobDataset(job, label, gone = false) {
  if (job.dataset_source === "manifest") return h("span", { class: "dataset-source" }, "manifest");
  if (!job.dataset_id || gone) return h("span", { class: "deleted-dataset" }, DELETED_DATASET);
  return datasetLink(job.dataset_id, label);
}

/** The stage column: the running stage, "done" once a job succeeded, where it stopped once it failed or was
 * cancelled (a finished job's `stage` is the last one it was in, which alone reads as if it were still there). */
export function stageText(job) {
  if (ACTIVE.has(job.status)) return job.stage || "–";
  if (job.status === "succeeded") return "done";
  return job.stage ? `stopped in ${job.stage}` : "–";
}
