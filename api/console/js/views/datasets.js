// The datasets list and one dataset: classes with per-class counts, the test split's origin, skipped files
// with their reasons, duplicates and warnings.

import { getJSON, seg } from "../api.js";
import { h, replace, table } from "../dom.js";
import { bytes, percent, when } from "../format.js";
import { datasetLink, errorNote, notFound, statusBadge } from "./common.js";

const NOT_FOUND_TEXT = "No dataset with this id is visible with this key: it does not exist, was deleted, or "
  + "belongs to another tenant.";
const LIST_LIMIT = 200;

export async function datasetsView(root, signal) {
  const holder = h("div", { id: "datasets-table" }, h("p", { class: "hint" }, "Loading…"));
  replace(root, h("h1", {}, "Datasets"), holder);
  try {
    const page = await getJSON(`/v1/datasets?limit=${LIST_LIMIT}`, { signal });
    if (!page.items.length) {
      replace(holder, h("p", { class: "empty" }, "No datasets yet. Upload one with POST /v1/datasets."));
      return;
    }
    replace(holder, table(["Name", "Status", "Classes", "Train", "Test", "Size", "Created"],
      page.items.map((d) => h("tr", { "data-dataset-id": d.id },
        h("td", {}, datasetLink(d.id, d.name)),
        h("td", {}, statusBadge(d.status)),
        h("td", { class: "num" }, String(d.num_classes)),
        h("td", { class: "num" }, String(d.splits.train ?? "–")),
        h("td", { class: "num" }, String(d.splits.test ?? "–")),
        h("td", { class: "num" }, bytes(d.size_bytes)),
        h("td", {}, when(d.created_at)))),
      { class: "datasets" }));
  } catch (error) {
    if (!signal.aborted) replace(holder, errorNote(error));
  }
}

function testSplitText(split) {
  if (!split || !split.source) return "–";
  if (split.source === "archive") return "from the archive's own test/val folder";
  if (split.source === "carved") return `carved from train (${percent(split.fraction, 0)} per class, seeded)`;
  return String(split.source);
}

function classTable(dataset) {
  return table(["Class", "Train", "Test"], dataset.classes.map((name) => {
    const counts = dataset.per_class[name] || {};
    return h("tr", { "data-class": name },
      h("td", { class: "class-name" }, name),
      h("td", { class: "num train-count" }, String(counts.train ?? 0)),
      h("td", { class: "num test-count" }, String(counts.test ?? 0)));
  }), { class: "classes", id: "class-table" });
}

function skippedSection(errors) {
  return h("section", { id: "dataset-skipped" },
    h("h2", {}, `Skipped files (${errors.length})`),
    errors.length
      ? table(["File", "Why"], errors.map((e) => [h("code", {}, String(e.path ?? e.code ?? "–")),
        String(e.reason ?? e.message ?? "")]), { class: "skipped" })
      : h("p", { class: "empty" }, "None: every file was used."));
}

function warningsSection(warnings) {
  return h("section", { id: "dataset-warnings" },
    h("h2", {}, `Warnings (${warnings.length})`),
    warnings.length
      ? h("ul", { class: "warnings" }, warnings.map((w) => h("li", {}, h("code", {}, String(w.code ?? "warning")),
        " ", String(w.message ?? ""))))
      : h("p", { class: "empty" }, "None."));
}

function duplicatesSection(duplicates) {
  const split = (name) => duplicates[name] || {};
  const examples = Array.isArray(duplicates.examples) ? duplicates.examples : [];
  return h("section", { id: "dataset-duplicates" },
    h("h2", {}, "Duplicates"),
    h("dl", { class: "fields" },
      h("dt", {}, "Train"), h("dd", {}, `${split("train").duplicate_images ?? 0} duplicate images in `
        + `${split("train").groups ?? 0} groups`),
      h("dt", {}, "Test"), h("dd", {}, `${split("test").duplicate_images ?? 0} duplicate images in `
        + `${split("test").groups ?? 0} groups`),
      h("dt", {}, "Test images also in train"), h("dd", {}, String(duplicates.test_in_train ?? 0)),
      h("dt", {}, "Dropped"), h("dd", {}, String(duplicates.dropped ?? 0))),
    examples.length
      ? table(["Kept (or in train)", "Copy"], examples.map((pair) =>
        [h("code", {}, String(pair[0])), h("code", {}, String(pair[1]))]), { class: "duplicate-examples" })
      : null);
}

export async function datasetView(root, datasetId, signal) {
  let dataset;
  try {
    dataset = await getJSON(`/v1/datasets/${seg(datasetId)}`, { signal });
  } catch (error) {
    if (error.notFound) {
      replace(root, notFound("Dataset", NOT_FOUND_TEXT));
      return;
    }
    throw error;
  }
  replace(root,
    h("p", { class: "crumbs" }, h("a", { href: "#/datasets" }, "← Datasets")),
    h("h1", { id: "dataset-name" }, dataset.name),
    h("dl", { class: "fields" },
      h("dt", {}, "Id"), h("dd", {}, h("code", {}, dataset.id)),
      h("dt", {}, "Status"), h("dd", {}, statusBadge(dataset.status)),
      h("dt", {}, "Classes"), h("dd", {}, String(dataset.num_classes)),
      h("dt", {}, "Images"), h("dd", {}, `${dataset.splits.train ?? 0} train, ${dataset.splits.test ?? 0} test`),
      h("dt", {}, "Test split"), h("dd", {}, testSplitText(dataset.test_split)),
      h("dt", {}, "Size"), h("dd", {}, bytes(dataset.size_bytes)),
      h("dt", {}, "Uploaded"), h("dd", {}, when(dataset.created_at))),
    h("section", { id: "dataset-classes" }, h("h2", {}, "Classes"), classTable(dataset)),
    skippedSection(dataset.errors || []),
    duplicatesSection(dataset.duplicates || {}),
    warningsSection(dataset.warnings || []));
}
