// A finished job's results: the report as a table (teacher with committee members, student, random baseline,
// DD-Ranking metrics, what the download weighs against the real data), the images it produced, and its artifacts
// with sizes and sha256.

import { apiFetch, artifactPath, blobURL, download } from "../api.js";
import { h, table } from "../dom.js";
import { bytes, percent, points, yesNo } from "../format.js";
import { errorNote } from "./common.js";

const interval = (value) => (Array.isArray(value) && value.length === 2
  ? `[${points(value[0])}, ${points(value[1])}]` : "–");
const size = (value) => (typeof value === "number" ? `${bytes(value)} (${value} bytes)` : "–");
const ratio = (value) => (typeof value === "number" && Number.isFinite(value) ? `×${value.toFixed(1)}` : "–");
const plain = (value) => (value === null || value === undefined ? "–"
  : typeof value === "number" ? String(Number(value.toPrecision(6))) : typeof value === "string" ? value
    : JSON.stringify(value));

// [metric key, label, format]; grouped as the report reads.
const GROUPS = [
  ["Teacher", [
    ["teacher_accuracy", "Teacher test accuracy", percent],
    ["teacher_backbone_accuracy", "Teacher test accuracy, backbone only", percent],
    ["teacher_val_accuracy", "Teacher validation accuracy", percent],
  ]],
  ["Student", [["student_accuracy", "Student accuracy (trained on the distilled set only)", percent]]],
  ["Random baseline", [
    ["random_baseline_accuracy", "Random real subset of the same size, trained the same way", percent],
  ]],
  ["DD-Ranking", [
    ["ior", "IOR (improvement over random)", points],
    ["ior_ci95", "IOR 95 % interval", interval],
    ["beats_random", "Beats random", yesNo],
    ["verdict", "Verdict", plain],
    ["hard_label_accuracy", "Hard-label accuracy on the set", percent],
    ["full_data_accuracy", "Hard-label accuracy on all real train images", percent],
    ["hlr", "HLR (hard-label recovery)", points],
    ["hlr_ci95", "HLR 95 % interval", interval],
  ]],
  // The download (distilled images + soft labels) against the real training data (report.json → storage).
  ["Storage", [
    ["distilled_images_bytes", "Distilled images (encoded files in distilled.tar.gz)", size],
    ["soft_labels_bytes", "Soft labels", size],
    ["soft_labels_kind", "Soft labels are", plain],
    ["compressed_bytes", "Images + soft labels", size],
    ["real_data_bytes", "Real training data", size],
    ["real_data_kind", "Real data counted as", plain],
    ["compression_ratio", "Compression ratio: real data / (images + soft labels)", ratio],
    ["teacher_bytes", "Teacher (teacher.safetensors)", size],
    ["soft_labels_file_bytes", "soft_labels.safetensors", size],
  ]],
];
const KNOWN = new Set(GROUPS.flatMap(([, rows]) => rows.map(([key]) => key)));

function valueCell(value, format, key) {
  return h("td", { class: "num", "data-metric": key, "data-value": JSON.stringify(value ?? null) }, format(value));
}

/** report.json of a succeeded job whose artifacts are still there, else null. */
export async function loadReport(job, signal) {
  if (job.artifacts_expired || !job.artifacts.some((a) => a.name === "report.json")) return null;
  try {
    return await (await apiFetch(artifactPath(job.id, "report.json"), { signal })).json();
  } catch {
    return null;
  }
}

function membersTable(members) {
  return h("div", { class: "members" },
    h("h3", {}, `Teacher committee (${members.length} members)`),
    table(["Member", "Backbone", "Width", "Weight", "Test accuracy", "Backbone-only test accuracy", "Validation accuracy"],
      members.map((m) => h("tr", { "data-member": String(m.name) },
        h("td", {}, String(m.name ?? "–")),
        h("td", {}, String(m.backbone ?? "–")),
        h("td", { class: "num" }, plain(m.model_width)),
        h("td", { class: "num" }, plain(m.weight)),
        valueCell(m.test_accuracy, percent, "test_accuracy"),
        valueCell(m.backbone_test_accuracy, percent, "backbone_test_accuracy"),
        valueCell(m.val_accuracy, percent, "val_accuracy"))),
      { class: "members-table" }));
}

/** The metrics table (from the job's metrics; committee members and the verdict's sentence from the report). */
export function reportSection(job, report) {
  const metrics = job.metrics || {};
  const bodies = GROUPS.map(([title, rows]) => {
    const present = rows.filter(([key]) => key in metrics);
    if (!present.length) return null;
    return h("tbody", { "data-group": title },
      h("tr", { class: "group" }, h("th", { colspan: 2, scope: "rowgroup" }, title)),
      present.map(([key, label, format]) =>
        h("tr", { "data-row": key }, h("th", { scope: "row" }, label), valueCell(metrics[key], format, key))));
  });
  const others = Object.keys(metrics).filter((key) => !KNOWN.has(key));
  if (others.length) {
    bodies.push(h("tbody", { "data-group": "Other" },
      h("tr", { class: "group" }, h("th", { colspan: 2, scope: "rowgroup" }, "Other")),
      others.map((key) => h("tr", { "data-row": key }, h("th", { scope: "row" }, key),
        valueCell(metrics[key], plain, key)))));
  }
  const teacher = report && report.teacher;
  const verdict = report && report.comparison && report.comparison.verdict;
  return h("section", { id: "job-report" },
    h("h2", {}, "Report"),
    Object.keys(metrics).length
      ? h("table", { class: "report", id: "report-table" }, bodies)
      : h("p", { class: "empty" }, "No metrics: the job ended before evaluation."),
    verdict && verdict.message ? h("p", { class: "verdict", id: "verdict-message" }, String(verdict.message)) : null,
    teacher && Array.isArray(teacher.members) ? membersTable(teacher.members) : null);
}

/** The artifacts with size, sha256 and a download button (fetch with the key → blob → a.download). */
export function artifactsSection(job, onError) {
  const rows = job.artifacts.map((artifact) => {
    const button = h("button", { type: "button", class: "download", disabled: job.artifacts_expired },
      "Download");
    button.addEventListener("click", () => download(artifactPath(job.id, artifact.name), artifact.name)
      .catch(onError));
    return h("tr", { "data-artifact": artifact.name },
      h("td", { class: "artifact-name" }, artifact.name),
      h("td", {}, artifact.media_type),
      h("td", { class: "num artifact-size", "data-value": String(artifact.size) },
        `${bytes(artifact.size)} (${artifact.size} bytes)`),
      h("td", { class: "artifact-sha256" }, h("code", {}, artifact.sha256)),
      h("td", {}, button));
  });
  return h("section", { id: "job-artifacts" },
    h("h2", {}, "Artifacts"),
    job.artifacts_expired
      ? h("p", { class: "expired", id: "artifacts-expired" }, "Artifacts expired: the operator's retention "
        + "period removed these files; they stay listed with their sizes and checksums as a record.")
      : null,
    rows.length ? table(["Name", "Type", "Size", "SHA-256", ""], rows, { class: "artifacts" })
      : h("p", { class: "empty" }, "This job has no artifacts."));
}

function previewCaption(job) {
  const attention = job.spec && job.spec.cal;
  return `One row per class, one column per distilled image${attention
    ? ", each image followed by the teacher's attention map (CAL)" : ""}.`;
}

/** Every image artifact (preview.png: the distilled images and attention maps), fetched with the key. */
export async function imagesSection(job, classes, signal, keepURL) {
  const images = job.artifacts_expired ? [] : job.artifacts.filter((a) => a.media_type.startsWith("image/"));
  if (!images.length) return null;
  const figures = await Promise.all(images.map(async (artifact) => {
    try {
      const url = keepURL(await blobURL(artifactPath(job.id, artifact.name), { signal }));
      const img = h("img", { src: url, alt: artifact.name, class: "artifact-image", "data-artifact": artifact.name });
      const isPreview = artifact.name === "preview.png";
      const labels = isPreview && classes && classes.length
        ? h("ol", { class: "row-labels", "aria-label": "classes, one per row" },
          classes.slice(0, 100).map((name) => h("li", {}, name)))
        : null;
      return h("figure", { class: "image" },
        h("div", { class: "image-scroll" }, labels, img),
        h("figcaption", {}, isPreview ? previewCaption(job) : artifact.name));
    } catch (error) {
      return errorNote(error);
    }
  }));
  return h("section", { id: "job-images" }, h("h2", {}, "Distilled images"), figures);
}
