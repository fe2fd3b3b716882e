// The console's entry: hash routes (#/jobs, #/jobs/<id>, #/datasets, #/datasets/<id>) over one static page.
// Each page gets an AbortSignal that ends its polling and streams when the route changes.

import { forgetKey, getKey, UNAUTHORIZED_EVENT } from "./api.js";
import { h, replace } from "./dom.js";
import { errorNote, notFound } from "./views/common.js";
import { datasetsView, datasetView } from "./views/datasets.js";
import { jobsView } from "./views/jobs.js";
import { jobView } from "./views/job.js";
import { keyView } from "./views/key.js";

const ROUTES = [
  [/^#\/jobs\/?$/, "jobs", (root, params, signal) => jobsView(root, signal)],
  [/^#\/jobs\/([^/]+)$/, "jobs", (root, [id], signal) => jobView(root, id, signal)],
  [/^#\/datasets\/?$/, "datasets", (root, params, signal) => datasetsView(root, signal)],
  [/^#\/datasets\/([^/]+)$/, "datasets", (root, [id], signal) => datasetView(root, id, signal)],
];

const root = document.getElementById("view");
const nav = document.getElementById("nav");
const forgetButton = document.getElementById("forget-key");
let current = null;

function leavePage() {
  if (current) current.abort();
  current = null;
}

function showKeyPrompt(message) {
  leavePage();
  nav.hidden = true;
  forgetButton.hidden = true;
  keyView(root, { message, onAccepted: route });
}

function decode(part) {
  try {
    return decodeURIComponent(part);
  } catch {
    return part;
  }
}

function route() {
  leavePage();
  if (!getKey()) {
    showKeyPrompt();
    return;
  }
  nav.hidden = false;
  forgetButton.hidden = false;
  const hash = window.location.hash || "#/jobs";
  const match = ROUTES.find(([pattern]) => pattern.test(hash));
  for (const link of nav.querySelectorAll("a")) {
    link.classList.toggle("current", Boolean(match) && link.dataset.nav === match[1]);
  }
  if (!match) {
    replace(root, notFound("Page", "This console has Jobs and Datasets pages."));
    return;
  }
  const [pattern, , view] = match;
  const params = pattern.exec(hash).slice(1).map(decode);
  const controller = new AbortController();
  current = controller;
  view(root, params, controller.signal).catch((error) => {
    if (controller.signal.aborted || error.status === 401) return;
    replace(root, h("h1", {}, "Something went wrong"), errorNote(error));
  });
}

forgetButton.addEventListener("click", () => {
  forgetKey();
  showKeyPrompt();
});
window.addEventListener(UNAUTHORIZED_EVENT, () => {
  forgetKey();
  showKeyPrompt("The key was not accepted (unknown or revoked). Enter a valid API key.");
});
window.addEventListener("hashchange", route);
if (!window.location.hash) window.history.replaceState(null, "", "#/jobs");
route();
