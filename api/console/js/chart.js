// Loss curves as inline SVG (no chart library): one chart per stage, one line per loss term, x = the stage's
// progress in percent (0–100 %) when each event was written.
//
// A term's line is cut into segments where the stage's progress goes backwards or the stage starts again (a
// job resumed on another worker), so no line joins two runs. The evaluate stage trains its students one after
// another under their own terms (student_loss, random_baseline_loss, …), so each student is its own line.

import { h, svg } from "./dom.js";

const WIDTH = 560;
const HEIGHT = 220;
const MARGIN = { left: 56, right: 28, top: 14, bottom: 30 };
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
export const X_TICKS = [0, 25, 50, 75, 100];

function short(value) {
  return Math.abs(value) >= 100 || value === 0 ? value.toFixed(0) : value.toPrecision(3);
}

/** The stage's progress as a percent in 0–100, or null when the event has none. */
function percentOf(event) {
  const value = event.data && event.data.stage_progress;
  if (typeof value !== "number" || !Number.isFinite(value)) return null;
  return 100 * Math.min(1, Math.max(0, value));
}

/**
 * {stage: {name: [segment, ...]}} from job events, a segment being [[x %, y], ...] with x rising. A new segment
 * starts where x goes backwards or at the stage's `stage_start` after points were drawn.
 */
export function lossSeries(events) {
  const stages = new Map();
  const lastX = new Map(); // stage → x of its previous event
  for (const event of events) {
    if (!event.stage) continue;
    if (!stages.has(event.stage)) stages.set(event.stage, new Map());
    const series = stages.get(event.stage);
    const x = percentOf(event);
    const restarted = event.kind === "stage_start"
      || (x !== null && lastX.has(event.stage) && x < lastX.get(event.stage));
    if (restarted) for (const segments of series.values()) if (segments.at(-1).length) segments.push([]);
    if (x !== null) lastX.set(event.stage, x);
    const losses = event.data && event.data.losses;
    if (!losses || x === null) continue;
    for (const [name, value] of Object.entries(losses)) {
      if (typeof value !== "number" || !Number.isFinite(value)) continue;
      if (!series.has(name)) series.set(name, [[]]);
      series.get(name).at(-1).push([x, value]);
    }
  }
  for (const [stage, series] of stages) {
    for (const [name, segments] of series) {
      const drawn = segments.filter((segment) => segment.length);
      if (drawn.length) series.set(name, drawn);
      else series.delete(name);
    }
    if (!series.size) stages.delete(stage);
  }
  return stages;
}

/** Round tick values covering [lo, hi] (about four steps of 1, 2 or 5 × 10^k). */
export function niceTicks(lo, hi) {
  if (!(hi > lo)) hi = lo + 1;
  const raw = (hi - lo) / 4;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const first = Math.floor(lo / step);
  const last = Math.ceil(hi / step);
  const ticks = [];
  for (let i = first; i <= last; i += 1) ticks.push(Number((i * step).toPrecision(12)));
  return ticks;
}

/** A <figure> with the SVG chart and a legend (last value of each term). */
export function lossChart(stage, series) {
  const ys = [...series.values()].flat(2).map(([, y]) => y);
  const yTicks = niceTicks(Math.min(...ys, 0), Math.max(...ys));
  const [y0, y1] = [yTicks[0], yTicks.at(-1)];
  const decimals = Math.max(0, Math.ceil(-Math.log10(yTicks[1] - yTicks[0]) - 1e-9));
  const plotW = WIDTH - MARGIN.left - MARGIN.right;
  const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
  const px = (x) => MARGIN.left + (x / 100) * plotW;
  const py = (y) => MARGIN.top + (1 - (y - y0) / (y1 - y0)) * plotH;
  const at = (value) => value.toFixed(1);

  const yGrid = yTicks.map((y) => [
    svg("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: at(py(y)), y2: at(py(y)), class: "grid" }),
    svg("text", { x: MARGIN.left - 6, y: at(py(y) + 4), "text-anchor": "end", class: "tick" }, y.toFixed(decimals)),
  ]);
  const xGrid = X_TICKS.map((x) => [
    svg("line", { x1: at(px(x)), x2: at(px(x)), y1: MARGIN.top, y2: HEIGHT - MARGIN.bottom, class: "grid" }),
    svg("text", { x: at(px(x)), y: HEIGHT - 10, "text-anchor": "middle", class: "tick x-tick" }, `${x} %`),
  ]);
  const lines = [...series.entries()].map(([name, segments], i) => {
    const color = COLORS[i % COLORS.length];
    return svg("g", { class: "series", "data-loss": name },
      svg("title", {}, name),
      segments.map((points) => {
        if (points.length > 1) {
          return svg("polyline", {
            points: points.map(([x, y]) => `${at(px(x))},${at(py(y))}`).join(" "),
            fill: "none", stroke: color, "stroke-width": 2,
          });
        }
        const [[x, y]] = points; // one event only: a marker with its value
        const right = px(x) > WIDTH - MARGIN.right - 60;
        return svg("g", { class: "single-point" },
          svg("circle", { cx: at(px(x)), cy: at(py(y)), r: 4, fill: color }),
          svg("text", { x: at(px(x) + (right ? -8 : 8)), y: at(py(y) - 6), "text-anchor": right ? "end" : "start",
            class: "tick point-value" }, short(y)));
      }));
  });
  const chart = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "chart", role: "img",
    "aria-label": `${stage} losses over the stage's progress`,
  }, yGrid, xGrid, lines);
  const legend = h("ul", { class: "legend" }, [...series.entries()].map(([name, segments], i) =>
    h("li", {}, h("span", { class: `swatch swatch-${i % COLORS.length}` }),
      `${name}: ${short(segments.at(-1).at(-1)[1])}`)));
  return h("figure", { class: "loss-chart", "data-stage": stage },
    h("figcaption", {}, `${stage} — losses (x: stage progress)`), chart, legend);
}
