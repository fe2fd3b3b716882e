// Loss curves as inline SVG (no chart library): one chart per stage, one line per loss term, x = the stage's
// progress (0–1) when each event was written.

import { h, svg } from "./dom.js";

const WIDTH = 560;
const HEIGHT = 220;
const MARGIN = { left: 56, right: 12, top: 12, bottom: 28 };
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

function short(value) {
  return Math.abs(value) >= 100 || value === 0 ? value.toFixed(0) : value.toPrecision(3);
}

/** Collect {stage: {name: [[x, y], ...]}} from job events with data.losses. */
export function lossSeries(events) {
  const stages = new Map();
  for (const event of events) {
    const losses = event.data && event.data.losses;
    if (!losses || !event.stage) continue;
    const x = typeof event.data.stage_progress === "number" ? event.data.stage_progress : null;
    if (!stages.has(event.stage)) stages.set(event.stage, new Map());
    const series = stages.get(event.stage);
    for (const [name, value] of Object.entries(losses)) {
      if (typeof value !== "number" || !Number.isFinite(value)) continue;
      if (!series.has(name)) series.set(name, []);
      const points = series.get(name);
      points.push([x === null ? points.length : x, value]);
    }
  }
  return stages;
}

/** A <figure> with the SVG chart and a legend (last value of each term). */
export function lossChart(stage, series) {
  const all = [...series.values()].flat();
  const xs = all.map(([x]) => x);
  const ys = all.map(([, y]) => y);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys, 0), Math.max(...ys)];
  if (x1 === x0) [x0, x1] = [x0 - 0.5, x1 + 0.5];
  if (y1 === y0) y1 = y0 + 1;
  const plotW = WIDTH - MARGIN.left - MARGIN.right;
  const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
  const px = (x) => MARGIN.left + ((x - x0) / (x1 - x0)) * plotW;
  const py = (y) => MARGIN.top + (1 - (y - y0) / (y1 - y0)) * plotH;

  const grid = [y0, (y0 + y1) / 2, y1].map((y) => [
    svg("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: py(y), y2: py(y), class: "grid" }),
    svg("text", { x: MARGIN.left - 6, y: py(y) + 4, "text-anchor": "end", class: "tick" }, short(y)),
  ]);
  const xTicks = [x0, x1].map((x) =>
    svg("text", { x: px(x), y: HEIGHT - 8, "text-anchor": "middle", class: "tick" }, short(x)));
  const lines = [...series.entries()].map(([name, points], i) => {
    const color = COLORS[i % COLORS.length];
    const path = points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ");
    return svg("g", { class: "series", "data-loss": name },
      svg("title", {}, name),
      points.length > 1 ? svg("polyline", { points: path, fill: "none", stroke: color, "stroke-width": 2 }) : null,
      points.map(([x, y]) => svg("circle", { cx: px(x), cy: py(y), r: 2.5, fill: color })));
  });
  const chart = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "chart", role: "img",
    "aria-label": `${stage} losses over the stage's progress`,
  }, grid, xTicks, lines);
  const legend = h("ul", { class: "legend" }, [...series.entries()].map(([name, points], i) =>
    h("li", {}, h("span", { class: `swatch swatch-${i % COLORS.length}` }), `${name}: ${short(points.at(-1)[1])}`)));
  return h("figure", { class: "loss-chart", "data-stage": stage },
    h("figcaption", {}, `${stage} — losses (x: stage progress)`), chart, legend);
}
